from __future__ import annotations

import datetime

import django_filters
from django import forms
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, status
from rest_framework.decorators import action
from rest_framework.exceptions import PermissionDenied
from rest_framework.response import Response

from apps.accounts.api.base import TeamScopedViewSet
from apps.accounts.permissions import can_cancel_job
from apps.scheduling import services
from apps.scheduling.api.serializers import (
    LIST_FIELDS,
    JobCreateSerializer,
    JobDetailSerializer,
    JobEventSerializer,
    JobSerializer,
    job_row,
)
from apps.scheduling.models import Job


class IdFilter(django_filters.NumberFilter):
    """A database id. NumberFilter takes any decimal and any size, and `team=-9e291` or `team=10**23`
    overflowed the database (a 500, found by the schema fuzzer)."""

    field_class = forms.IntegerField

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        kwargs.setdefault("min_value", 1)
        kwargs.setdefault("max_value", 2**63 - 1)
        super().__init__(*args, **kwargs)


class UtcIsoDateTimeField(django_filters.fields.IsoDateTimeField):
    """ISO 8601 allows UTC offsets up to ±23:59, PostgreSQL only ±15:59: `+17:53` was a 500 (found by
    the schema fuzzer). In UTC every offset is fine; a time that leaves the calendar in UTC is a 400."""

    def to_python(self, value):  # noqa: ANN001, ANN201
        value = super().to_python(value)
        if value is None:
            return None
        try:
            return value.astimezone(datetime.UTC)
        except OverflowError as exc:
            raise forms.ValidationError("Out of the range of dates.", code="invalid") from exc


class UtcIsoDateTimeFilter(django_filters.IsoDateTimeFilter):
    field_class = UtcIsoDateTimeField


class JobFilter(django_filters.FilterSet):
    state = django_filters.MultipleChoiceFilter(choices=Job.State.choices)
    kind = django_filters.ChoiceFilter(choices=Job.Kind.choices)
    priority = django_filters.ChoiceFilter(choices=Job.Priority.choices)
    team = IdFilter(field_name="team_id")
    submitter = django_filters.CharFilter(field_name="submitter__username", max_length=150,
                                          help_text="Jobs of this user (a username), like squeue -u.")
    submitted_after = UtcIsoDateTimeFilter(field_name="submitted_at", lookup_expr="gte")
    submitted_before = UtcIsoDateTimeFilter(field_name="submitted_at", lookup_expr="lt")

    class Meta:
        model = Job
        fields = ["state", "kind", "priority", "team"]


class JobViewSet(TeamScopedViewSet, mixins.ListModelMixin, mixins.RetrieveModelMixin):
    """Jobs of the caller's teams: submit, list, inspect, cancel, read the event history."""

    model = Job
    serializer_class = JobSerializer
    select_related = ("team", "submitter", "queue_entry")
    filterset_class = JobFilter
    ordering_fields = ["submitted_at", "priority", "state"]

    def list(self, request):  # noqa: ANN001, ANN201
        """Jobs of the caller's teams, newest first; filters: state, kind, priority, team, submitter,
        submitted_after/before."""
        queryset = self.filter_queryset(self.get_queryset()).values_list(*LIST_FIELDS)
        page = self.paginate_queryset(queryset)
        return self.get_paginated_response([job_row(values) for values in page])

    @extend_schema(responses=JobDetailSerializer)
    def retrieve(self, request, pk=None):  # noqa: ANN001, ANN201
        """One job, with where it stands in the queue (position, reason, ETA) while it waits."""
        job = self.get_object()
        return Response(JobDetailSerializer(job).data)

    @extend_schema(request=JobCreateSerializer, responses={201: JobSerializer})
    def create(self, request):  # noqa: ANN001, ANN201
        """Submit a job to the fair queue. It starts `queued`."""
        serializer = JobCreateSerializer(data=request.data, context=self.get_serializer_context())
        serializer.is_valid(raise_exception=True)
        job = serializer.save()
        return Response(JobSerializer(job).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=None, responses=JobSerializer)
    @action(detail=True, methods=["post"])
    def cancel(self, request, pk=None):  # noqa: ANN001, ANN201
        """Cancel: queued jobs end at once; running ones go `cancelling` until their worker stops them."""
        return self._act(request, "cancel", services.cancel_job)

    @extend_schema(request=None, responses=JobSerializer)
    @action(detail=True, methods=["post"])
    def hold(self, request, pk=None):  # noqa: ANN001, ANN201
        """Hold a queued job (like `scontrol hold`): the scheduler starts nothing of it until it is released."""
        return self._act(request, "hold", services.hold_job)

    @extend_schema(request=None, responses=JobSerializer)
    @action(detail=True, methods=["post"])
    def release(self, request, pk=None):  # noqa: ANN001, ANN201
        """Release a held job: the scheduler considers it again from its next pass."""
        return self._act(request, "release", services.release_job)

    def _act(self, request, verb: str, service) -> Response:  # noqa: ANN001
        """Cancel, hold or release: who may do one may do all three (`can_cancel_job`)."""
        job = self.get_object()
        if not can_cancel_job(request.user, job):
            raise PermissionDenied(f"Only the job's submitter, a lead of its team or staff can {verb} it.")
        return Response(JobSerializer(service(job, actor=request.user)).data)

    @extend_schema(responses=JobEventSerializer(many=True))
    @action(detail=True, methods=["get"])
    def events(self, request, pk=None):  # noqa: ANN001, ANN201
        """The job's history, oldest first (append-only)."""
        job = self.get_object()
        page = self.paginate_queryset(job.events.select_related("actor").order_by("ts", "id"))
        return self.get_paginated_response(JobEventSerializer(page, many=True).data)
