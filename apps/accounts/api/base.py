"""Cross-cutting API rules in one place: strict input, team scoping, atomic writes."""
from __future__ import annotations

from collections.abc import Mapping

from django.db import transaction
from rest_framework import serializers, viewsets


class StrictMixin:
    """Refuses keys it does not know: a typo like `keep_ration` is an error, not a silent default."""

    def to_internal_value(self, data):  # noqa: ANN001, ANN201
        if isinstance(data, Mapping):
            writable = {name for name, field in self.fields.items() if not field.read_only}
            unknown = sorted(set(data) - writable)
            if unknown:
                raise serializers.ValidationError({key: ["Unknown field."] for key in unknown})
        return super().to_internal_value(data)


class StrictSerializer(StrictMixin, serializers.Serializer):
    pass


class TeamScopedViewSet(viewsets.GenericViewSet):
    """Every queryset is the caller's teams' objects (staff: all), so another team's object is a 404.

    Subclasses set `model` with a `visible_to(user)` queryset method, and may add `select_related`.
    """

    model = None
    select_related: tuple[str, ...] = ()
    prefetch_related: tuple = ()

    def get_queryset(self):  # noqa: ANN201
        if getattr(self, "swagger_fake_view", False):  # schema generation has no user
            return self.model.objects.none()
        qs = self.model.objects.visible_to(self.request.user)
        if self.select_related:
            qs = qs.select_related(*self.select_related)
        if self.prefetch_related:
            qs = qs.prefetch_related(*self.prefetch_related)
        return qs

    def perform_create(self, serializer) -> None:  # noqa: ANN001
        with transaction.atomic():
            serializer.save()


class TeamField(serializers.Field):
    """A team by id or slug, among the teams the caller can see; others read as 'not found'."""

    default_error_messages = {
        "not_found": "No team '{value}' that you belong to.",
        "invalid": "Give a team id or slug.",
    }

    def to_internal_value(self, data):  # noqa: ANN001, ANN201
        from apps.accounts.models import Team

        if isinstance(data, bool) or not isinstance(data, int | str) or data == "":
            self.fail("invalid")
        user = self.context["request"].user
        qs = Team.objects.visible_to(user)
        if isinstance(data, int) or (isinstance(data, str) and data.isdigit()):
            found = qs.filter(pk=int(data)).first() if int(data) < 2**63 else None
        else:
            found = qs.filter(slug=data).first()
        if found is None:
            self.fail("not_found", value=str(data)[:100])
        return found

    def to_representation(self, value):  # noqa: ANN001, ANN201
        return value.pk
