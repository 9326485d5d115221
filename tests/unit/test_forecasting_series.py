"""Load series: the minute roll-up, downsampling and retention, the regular-grid history, the demo seed,
and who may read which series through the API."""
from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from django.core.management import CommandError, call_command

from apps.cluster.models import MetricSample
from apps.forecasting.models import Forecast, Series, SeriesPoint
from apps.forecasting.series import downsample, history, rollup_minute
from apps.scheduling.live import run_pass
from apps.scheduling.models import Allocation
from tests.unit.test_live_scheduler import submit

pytestmark = pytest.mark.django_db

T0 = datetime(2026, 11, 2, 9, 0, 30, tzinfo=UTC)  # a Monday


def value(key: str, resolution: int = 60) -> float:
    return SeriesPoint.objects.get(series__key=key, resolution_s=resolution).value


def test_the_rollup_counts_allocated_gpus_queued_demand_and_utilization_per_scope(
        alice, charlie, team_a, team_b, node_a, node_b, client_for):
    submit(client_for(alice), team_a, 4, "placed")
    submit(client_for(alice), team_a, 8, "waits")  # node_a has 8 GPUs, 4 are taken
    submit(client_for(charlie), team_b, 2, "b-placed")
    run_pass()
    MetricSample.objects.create(node=node_a, gpu_index=0, ts=T0 - timedelta(seconds=20), utilization=90.0)
    MetricSample.objects.create(node=node_a, gpu_index=1, ts=T0 - timedelta(seconds=10), utilization=70.0)
    MetricSample.objects.create(node=node_b, gpu_index=0, ts=T0 - timedelta(seconds=5), utilization=20.0)
    MetricSample.objects.create(node=node_b, gpu_index=1, ts=T0 - timedelta(minutes=5), utilization=0.0)  # too old

    rollup_minute(T0)

    assert value("cluster:all:allocated_gpus") == 6
    assert value(f"team:{team_a.pk}:allocated_gpus") == 4
    assert value(f"team:{team_b.pk}:allocated_gpus") == 2
    live = Allocation.objects.filter(released_at__isnull=True)
    for rack in ("r1", "r2"):  # best fit may put a job on the other team's node: count where the GPUs are
        assert value(f"rack:{rack}:allocated_gpus") == live.filter(node__rack=rack).count()
    assert value("rack:r1:allocated_gpus") + value("rack:r2:allocated_gpus") == 6
    assert value("cluster:all:queued_gpus") == 8
    assert value(f"team:{team_a.pk}:queued_gpus") == 8
    assert value(f"team:{team_b.pk}:queued_gpus") == 0
    assert value("cluster:all:gpu_utilization") == pytest.approx(60.0)
    assert value("rack:r1:gpu_utilization") == pytest.approx(80.0)
    assert SeriesPoint.objects.get(series__key="cluster:all:allocated_gpus").ts == T0.replace(second=0)


def test_a_second_rollup_in_the_same_minute_overwrites_instead_of_adding(alice, team_a, node_a, client_for):
    rollup_minute(T0)
    submit(client_for(alice), team_a, 3)
    rollup_minute(T0 + timedelta(seconds=20))
    assert SeriesPoint.objects.filter(series__key="cluster:all:queued_gpus").count() == 1
    assert value("cluster:all:queued_gpus") == 3


def test_no_gpu_sample_means_no_utilization_point_rather_than_zero(node_a):
    rollup_minute(T0)
    assert not SeriesPoint.objects.filter(series__key="cluster:all:gpu_utilization").exists()
    assert value("cluster:all:allocated_gpus") == 0


def _seed_minutes(series: Series, start: datetime, minutes: int, fn) -> None:  # noqa: ANN001
    SeriesPoint.objects.bulk_create(SeriesPoint(series=series, resolution_s=60, ts=start + timedelta(minutes=m),
                                                value=fn(m)) for m in range(minutes))


def test_downsampling_folds_complete_buckets_into_means_and_retention_deletes_old_points():
    series = Series.objects.create(key="cluster:all:allocated_gpus", scope="cluster", metric="allocated_gpus")
    start = T0.replace(second=0, minute=0)
    _seed_minutes(series, start, 125, lambda m: float(m))
    now = start + timedelta(minutes=125)

    downsample(now)

    tens = dict(SeriesPoint.objects.filter(series=series, resolution_s=600).values_list("ts", "value"))
    assert len(tens) == 12  # 12 complete 10-minute buckets; 120-124 is not complete
    assert tens[start] == pytest.approx(4.5)  # mean of 0..9
    assert tens[start + timedelta(minutes=110)] == pytest.approx(114.5)
    hours = dict(SeriesPoint.objects.filter(series=series, resolution_s=3600).values_list("ts", "value"))
    assert hours == {start: pytest.approx(29.5), start + timedelta(hours=1): pytest.approx(89.5)}

    # Idempotent: running it again changes nothing.
    downsample(now)
    assert SeriesPoint.objects.filter(series=series, resolution_s=600).count() == 12

    # Three days later the 1-minute points are gone, the coarse ones stay.
    downsample(now + timedelta(days=3))
    assert not SeriesPoint.objects.filter(series=series, resolution_s=60).exists()
    assert SeriesPoint.objects.filter(series=series, resolution_s=600).count() == 12


def test_history_is_a_regular_grid_that_prefers_the_finest_points():
    series = Series.objects.create(key="cluster:all:allocated_gpus", scope="cluster", metric="allocated_gpus")
    start = T0.replace(second=0, minute=0)
    # Old stretch: 10-minute points only; recent stretch: 1-minute points.
    SeriesPoint.objects.bulk_create(
        SeriesPoint(series=series, resolution_s=600, ts=start + timedelta(minutes=10 * k), value=100.0 + k)
        for k in range(6))
    _seed_minutes(series, start + timedelta(hours=1), 30, lambda m: 7.0)
    data = history(series, step=timedelta(minutes=5), since=start, until=start + timedelta(minutes=89))
    assert len(data) == 18
    assert data.index.freq is not None or (data.index[1] - data.index[0]) == timedelta(minutes=5)
    assert data.iloc[0] == 100.0
    assert data.iloc[1] == 100.0
    assert data.iloc[2] == 101.0
    assert data.iloc[12] == 7.0
    assert data.iloc[17] == 7.0
    assert data.notna().all()


def test_seed_history_scales_the_real_history_to_this_cluster_and_runs_once(node_a, node_b):
    call_command("seed_history", "--days", "7")
    allocated = SeriesPoint.objects.filter(series__key="cluster:all:allocated_gpus", resolution_s=600)
    assert 6 * 144 <= allocated.count() <= 7 * 144
    values = list(allocated.values_list("value", flat=True))
    assert 0 <= min(values)
    assert max(values) <= 12
    assert max(values) - min(values) > 1  # a real series moves
    newest = allocated.order_by("-ts").first().ts
    assert newest <= datetime.now(UTC)
    count = allocated.count()
    call_command("seed_history", "--days", "7")
    assert allocated.count() == count


def test_seed_history_refuses_a_cluster_without_gpus(db):
    with pytest.raises(CommandError, match="no GPUs registered"):
        call_command("seed_history")


def test_team_series_are_visible_to_the_team_and_404_to_others(alice, charlie, dana, team_a, team_b, node_a,
                                                               client_for):
    rollup_minute(T0)
    own = Series.objects.get(key=f"team:{team_a.pk}:allocated_gpus")
    Forecast.objects.create(series=own, origin=T0, step_s=300, method="test",
                            points=[[(T0 + timedelta(minutes=5)).isoformat(), 1.0, 0.5, 1.5]])
    keys_for = {user.username: {s["key"] for s in client_for(user).get("/api/v1/forecasts/").json()["results"]}
                for user in (alice, charlie, dana)}
    assert own.key in keys_for["alice"]
    assert own.key not in keys_for["charlie"]
    assert f"team:{team_b.pk}:allocated_gpus" in keys_for["charlie"]
    assert "cluster:all:allocated_gpus" in keys_for["charlie"]
    assert own.key in keys_for["dana"]
    assert client_for(charlie).get(f"/api/v1/forecasts/{own.pk}/").status_code == 404
    detail = client_for(alice).get(f"/api/v1/forecasts/{own.pk}/?hours=2").json()
    assert detail["forecast"]["points"][0]["yhat"] == 1.0
    assert detail["forecast"]["method"] == "test"
    bad = client_for(alice).get(f"/api/v1/forecasts/{own.pk}/?hours=lots")
    assert bad.status_code == 400
    assert "hours" in bad.json()
