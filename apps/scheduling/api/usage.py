"""`GET /api/v1/usage/`: each of your teams against its quotas (staff: every team), like Slurm's `sshare` /
`sreport`: GPUs held now of `max_gpus`, GPU-hours this calendar month (UTC) of `gpu_hours_per_month`, and its
queued and running jobs. The same figures as the team pages, from `apps/scheduling/usage.py` (three queries
per page, whatever the number of teams)."""
from __future__ import annotations

from rest_framework import mixins, serializers, viewsets
from rest_framework.response import Response

from apps.accounts.models import Team
from apps.scheduling.usage import month_start, team_usage


class TeamUsageSerializer(serializers.Serializer):
    team = serializers.IntegerField(source="pk")
    team_name = serializers.CharField(source="name")
    slug = serializers.CharField()
    weight = serializers.FloatField()
    gpus_in_use = serializers.IntegerField()
    max_gpus = serializers.IntegerField()
    gpu_hours_this_month = serializers.FloatField()
    gpu_hours_per_month = serializers.FloatField()
    month_start = serializers.DateTimeField()
    queued_jobs = serializers.IntegerField()
    running_jobs = serializers.IntegerField()


class UsageViewSet(mixins.ListModelMixin, viewsets.GenericViewSet):
    """Your teams' use of the cluster against their quotas (staff: every team)."""

    serializer_class = TeamUsageSerializer
    filter_backends: list = []

    def get_queryset(self):  # noqa: ANN201
        if getattr(self, "swagger_fake_view", False):
            return Team.objects.none()
        return Team.objects.visible_to(self.request.user).order_by("name")

    def list(self, request, *args, **kwargs):  # noqa: ANN001, ANN201
        page = self.paginate_queryset(self.get_queryset())
        teams = page if page is not None else list(self.get_queryset())
        usage = team_usage(teams)
        start = month_start()
        for team in teams:
            u = usage[team.pk]
            team.gpus_in_use, team.gpu_hours_this_month = u.gpus_in_use, u.gpu_hours_this_month
            team.queued_jobs, team.running_jobs, team.month_start = u.queued_jobs, u.running_jobs, start
        data = self.get_serializer(teams, many=True).data
        return self.get_paginated_response(data) if page is not None else Response(data)
