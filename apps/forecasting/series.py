"""Roll-ups: once a minute, the cluster's load as series points; downsampling and retention after.

Each minute writes, for the cluster, each rack and each team:
- `allocated_gpus`: GPUs held by live allocations (a job's team; the GPU's node's rack);
- `gpu_utilization`: the mean utilization of the GPU samples the agents sent in that minute (skipped
  when no sample came, rather than written as 0, which would read as an idle cluster);
- `queued_gpus`: the GPUs asked for by queued jobs (cluster and team; a queued job has no rack).

Downsampling folds complete 10-minute and hour buckets into coarser points (their mean) from the
finer ones; retention then deletes 1-minute points after `RETENTION["60"]` and so on, so a series
has at most about 2,900 + 8,600 + 17,500 rows whatever its age.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

import pandas as pd
from django.db import transaction
from django.db.models import Avg, Count, Sum
from django.utils import timezone

from apps.accounts.models import Team
from apps.cluster.models import GpuNode, MetricSample
from apps.scheduling.models import Allocation, Job
from apps.scheduling.states import JobState

from .models import Series, SeriesPoint

RETENTION = {60: timedelta(days=2), 600: timedelta(days=60), 3600: timedelta(days=730)}
CLUSTER_KEY = "cluster:all:{metric}"
ALLOCATED = Series.Metric.ALLOCATED_GPUS
UTILIZATION = Series.Metric.GPU_UTILIZATION
QUEUED = Series.Metric.QUEUED_GPUS


def floor_time(ts: datetime, seconds: int) -> datetime:
    epoch = int(ts.timestamp())
    return datetime.fromtimestamp(epoch - epoch % seconds, tz=UTC)


def series_key(scope: str, name: str | int, metric: str) -> str:
    return f"{scope}:{name}:{metric}"


class SeriesBook:
    """The series rows by key, created on first use (one query to load them all)."""

    def __init__(self) -> None:
        self.by_key = {s.key: s for s in Series.objects.all()}

    def get(self, scope: str, metric: str, *, rack: str = "", team: Team | int | None = None) -> Series:
        team_id = team.pk if isinstance(team, Team) else team
        name = {"cluster": "all", "rack": rack, "team": team_id}[scope]
        key = series_key(scope, name, metric)
        series = self.by_key.get(key)
        if series is None:
            series, _ = Series.objects.get_or_create(
                key=key, defaults={"scope": scope, "metric": metric, "rack": rack, "team_id": team_id})
            self.by_key[key] = series
        return series


def measure(now: datetime) -> list[tuple[str, str, dict, float]]:
    """What the cluster looks like now: (scope, metric, where, value) for every series."""
    rows: list[tuple[str, str, dict, float]] = []
    racks = sorted(set(GpuNode.objects.values_list("rack", flat=True)))
    team_ids = list(Team.objects.values_list("pk", flat=True))

    live = Allocation.objects.filter(released_at__isnull=True)
    by_team = dict(live.values_list("job__team_id").annotate(n=Count("id")))
    by_rack = dict(live.values_list("node__rack").annotate(n=Count("id")))
    rows.append(("cluster", ALLOCATED, {}, float(sum(by_team.values()))))
    rows += [("rack", ALLOCATED, {"rack": r}, float(by_rack.get(r, 0))) for r in racks]
    rows += [("team", ALLOCATED, {"team": t}, float(by_team.get(t, 0))) for t in team_ids]

    queued = Job.objects.filter(state=JobState.QUEUED)
    demand = dict(queued.values_list("team_id").annotate(g=Sum("gpus")))
    rows.append(("cluster", QUEUED, {}, float(sum(demand.values()))))
    rows += [("team", QUEUED, {"team": t}, float(demand.get(t, 0))) for t in team_ids]

    samples = MetricSample.objects.filter(gpu_index__isnull=False, utilization__isnull=False,
                                          ts__gt=now - timedelta(seconds=60), ts__lte=now)
    overall = samples.aggregate(u=Avg("utilization"))["u"]
    if overall is not None:
        rows.append(("cluster", UTILIZATION, {}, float(overall)))
        for rack, value in samples.values_list("node__rack").annotate(u=Avg("utilization")):
            rows.append(("rack", UTILIZATION, {"rack": rack}, float(value)))
        for team, value in samples.values_list("node__team_id").annotate(u=Avg("utilization")):
            rows.append(("team", UTILIZATION, {"team": team}, float(value)))
    return rows


def _upsert(points: Iterable[SeriesPoint]) -> int:
    points = list(points)
    if points:
        SeriesPoint.objects.bulk_create(points, update_conflicts=True, update_fields=["value"],
                                        unique_fields=["series", "resolution_s", "ts"])
    return len(points)


def rollup_minute(now: datetime | None = None) -> int:
    """Write this minute's points (idempotent: a second call in the same minute overwrites)."""
    now = now or timezone.now()
    bucket = floor_time(now, 60)
    book = SeriesBook()
    with transaction.atomic():
        return _upsert(
            SeriesPoint(series=book.get(scope, metric, **where), resolution_s=60, ts=bucket, value=value)
            for scope, metric, where, value in measure(now)
        )


def downsample(now: datetime | None = None) -> dict[int, int]:
    """Fold complete buckets into 10-minute and hourly points, then apply retention. Idempotent."""
    now = now or timezone.now()
    written = {}
    for fine, coarse in ((60, 600), (600, 3600)):
        end = floor_time(now, coarse)
        # Catch up from where the coarse points stop (a stopped server leaves no hole it could fill),
        # but never further back than the fine points are kept.
        last = SeriesPoint.objects.filter(resolution_s=coarse).order_by("-ts").values_list("ts", flat=True).first()
        start = max(last + timedelta(seconds=coarse) if last else end - RETENTION[fine], end - RETENTION[fine])
        sums: dict[tuple[int, datetime], list[float]] = defaultdict(lambda: [0.0, 0])
        fine_points = SeriesPoint.objects.filter(resolution_s=fine, ts__gte=start, ts__lt=end)
        for series_id, ts, value in fine_points.values_list("series_id", "ts", "value").iterator(chunk_size=5000):
            acc = sums[(series_id, floor_time(ts, coarse))]
            acc[0] += value
            acc[1] += 1
        written[coarse] = _upsert(
            SeriesPoint(series_id=sid, resolution_s=coarse, ts=ts, value=total / count)
            for (sid, ts), (total, count) in sums.items()
        )
    for resolution, keep in RETENTION.items():
        SeriesPoint.objects.filter(resolution_s=resolution, ts__lt=now - keep).delete()
    return written


def history(series: Series, *, step: timedelta, since: datetime, until: datetime) -> pd.Series:
    """The series on a regular grid of `step` from `since` to `until` (tz-naive UTC index, NaN where no data).

    Takes the finest points available for each stretch: the hour points where only those are left,
    10-minute points next, 1-minute points for the recent past; a coarser point fills every finer
    bucket it covers.
    """
    return histories([series], step=step, since=since, until=until)[series.pk]


def histories(series: Iterable[Series], *, step: timedelta, since: datetime, until: datetime,
              latest: dict | None = None) -> dict[int, pd.Series]:
    """`history` of several series with one query (a page of charts must not cost three per chart).

    When `latest` is a dict, it receives per series the last 1-minute value inside each step (NaN where
    only coarser points are kept): a fresher level than the step's mean, which the forecaster uses."""
    step_s = int(step.total_seconds())
    start = floor_time(since, step_s)
    end = floor_time(until, step_s)
    index = pd.date_range(start.replace(tzinfo=None), end.replace(tzinfo=None), freq=f"{step_s}s")
    ids = [s.pk for s in series]
    rows: dict[tuple[int, int], list[tuple[datetime, float]]] = defaultdict(list)
    # The last grid step is the bucket [end, end + step): the minutes of it that have passed count.
    points = SeriesPoint.objects.filter(series_id__in=ids, ts__gte=start - timedelta(hours=1), ts__lt=end + step)
    for series_id, resolution, ts, value in points.values_list("series_id", "resolution_s", "ts", "value"):
        rows[(series_id, resolution)].append((ts, value))
    out = {}
    for series_id in ids:
        values = pd.Series(float("nan"), index=index)
        for resolution in (3600, 600, 60):
            found = rows.get((series_id, resolution))
            if not found:
                continue
            raw = pd.Series([v for _, v in found],
                            index=pd.DatetimeIndex([t.astimezone(UTC).replace(tzinfo=None) for t, _ in found]))
            raw = raw[~raw.index.duplicated()].sort_index()
            if resolution >= step_s:
                # A coarse point holds for every step inside its bucket.
                spread = raw.reindex(raw.index.union(index)).ffill(limit=max(1, resolution // step_s - 1))
                spread = spread.reindex(index)
            else:
                spread = raw.resample(f"{step_s}s").mean().reindex(index)
                if latest is not None:
                    latest[series_id] = raw.resample(f"{step_s}s").last().reindex(index)
            values = spread.combine_first(values)  # finer resolutions come later and win
        out[series_id] = values
        if latest is not None:
            latest.setdefault(series_id, pd.Series(float("nan"), index=index))
    return out
