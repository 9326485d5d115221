"""What a team is using against its quota: GPUs held now and GPU-hours this month (from allocations)."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from django.db.models import Count, F, Q
from django.db.models.functions import Coalesce, Greatest
from django.utils import timezone

from apps.accounts.models import Team

from .models import Allocation, Job
from .states import LIVE


@dataclass(frozen=True)
class TeamUsage:
    team_id: int
    gpus_in_use: int
    gpu_hours_this_month: float
    queued_jobs: int
    running_jobs: int


def month_start(now: datetime | None = None) -> datetime:
    now = now or timezone.now()
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def team_usage(teams: list[Team] | None = None, now: datetime | None = None) -> dict[int, TeamUsage]:
    """Usage of each team in three queries, whatever the number of teams."""
    now = now or timezone.now()
    start = month_start(now)
    team_ids = [t.pk for t in teams] if teams is not None else list(Team.objects.values_list("pk", flat=True))
    in_use = dict(
        Allocation.objects.filter(job__team_id__in=team_ids, released_at__isnull=True)
        .values("job__team_id").annotate(n=Count("id")).values_list("job__team_id", "n")
    )
    # GPU-seconds of every allocation that overlaps this month, clipped to the month and to now.
    overlapping = Allocation.objects.filter(job__team_id__in=team_ids).filter(
        Q(released_at__isnull=True) | Q(released_at__gt=start)
    )
    seconds: dict[int, float] = {}
    for team_id, begin, end in overlapping.annotate(
        begin=Greatest(F("created_at"), start), end=Coalesce(F("released_at"), now)
    ).values_list("job__team_id", "begin", "end"):
        seconds[team_id] = seconds.get(team_id, 0.0) + max(0.0, (end - begin).total_seconds())
    counts = {
        (row["team_id"], row["state"]): row["n"]
        for row in Job.objects.filter(team_id__in=team_ids, state__in=["queued", *LIVE])
        .values("team_id", "state").annotate(n=Count("id"))
    }
    return {
        tid: TeamUsage(
            team_id=tid,
            gpus_in_use=in_use.get(tid, 0),
            gpu_hours_this_month=round(seconds.get(tid, 0.0) / 3600, 2),
            queued_jobs=counts.get((tid, "queued"), 0),
            running_jobs=sum(counts.get((tid, s), 0) for s in LIVE),
        )
        for tid in team_ids
    }


__all__ = ["TeamUsage", "month_start", "team_usage"]
