"""forecast_series with the real forecaster (Prophet included) over series points in the database: the
forecast path, the cached fit, a stale cached state, and too little data."""
from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest

from apps.forecasting.models import Forecast, ForecasterState, Series, SeriesPoint
from apps.forecasting.services import HORIZONS, forecast_series, refresh_forecasts
from tests.unit.test_metrics import REDIS_DB11, redis_db11

pytestmark = pytest.mark.django_db

NOW = datetime(2026, 11, 6, 12, 0, tzinfo=UTC)


def daily_wave(series: Series, days: int) -> None:
    start = NOW - timedelta(days=days)
    SeriesPoint.objects.bulk_create(
        SeriesPoint(series=series, resolution_s=600, ts=start + timedelta(minutes=10 * k),
                    value=20 + 10 * math.sin(2 * math.pi * k / 144))
        for k in range(days * 144))


@pytest.fixture
def cluster_series() -> Series:
    return Series.objects.create(key="cluster:all:allocated_gpus", scope="cluster", metric="allocated_gpus")


def test_a_forecast_covers_5_minutes_to_24_hours_with_bands_and_caches_its_fit(cluster_series):
    daily_wave(cluster_series, days=4)
    forecast = forecast_series(cluster_series, NOW)
    assert forecast.refitted
    assert len(forecast.points) == len(HORIZONS) == 112
    first, last = forecast.points[0], forecast.points[-1]
    assert datetime.fromisoformat(first[0]) - forecast.origin == timedelta(minutes=5)
    assert datetime.fromisoformat(last[0]) - forecast.origin == timedelta(hours=24)
    for _, yhat, lower, upper in forecast.points:
        assert 0 <= lower <= yhat <= upper
    # A daily wave is back where it was a day later: the 24 h forecast is near the last value.
    assert abs(last[1] - 20 - 10 * math.sin(2 * math.pi * (4 * 144 - 1) / 144)) < 3
    state = ForecasterState.objects.get(series=cluster_series)
    assert state.refits == 1
    assert state.fit_seconds_total > 0

    assert state.state["tracking"] == {}   # fitted at this origin: no later error to score yet

    # Ten minutes later, with a new point: the cached fit serves it, and the bands' tracked offsets,
    # which moved with the errors now observed, are kept for the next forecast.
    SeriesPoint.objects.create(series=cluster_series, resolution_s=600, ts=NOW, value=20.0)
    again = forecast_series(cluster_series, NOW + timedelta(minutes=10))
    assert not again.refitted  # refits are daily; the cached fit served this one
    state = ForecasterState.objects.get(series=cluster_series)
    assert state.refits == 1
    assert state.state["tracked_origin"] == again.origin.replace(tzinfo=None).isoformat()
    assert state.state["tracking"]  # one [lower, upper] offset per calibrated horizon
    assert forecast.track_record == {}   # nothing had come in after the fit
    # Ten minutes on, two 5-minute values have come in, each scored as the forecast from 10 minutes, 1 hour
    # and 6 hours before it: the new forecast carries its series' track record.
    assert set(again.track_record) == {"10min", "1h", "6h"}
    for scores in again.track_record.values():
        assert scores["scored"] == 2
        assert scores["mae"] < scores["mae_persistence"]   # the daily wave is what the forecaster knows


def test_a_state_from_another_forecaster_version_is_refitted_not_an_error(cluster_series):
    daily_wave(cluster_series, days=3)
    ForecasterState.objects.create(series=cluster_series, state={"version": -1}, fitted_at=NOW)
    forecast = forecast_series(cluster_series, NOW)
    assert forecast.refitted
    assert ForecasterState.objects.get(series=cluster_series).state["version"] != -1


def test_a_series_with_less_than_an_hour_of_data_gets_no_forecast(cluster_series):
    SeriesPoint.objects.create(series=cluster_series, resolution_s=60, ts=NOW, value=3.0)
    assert forecast_series(cluster_series, NOW) is None
    assert refresh_forecasts(NOW) == {}
    assert not Forecast.objects.exists()


# --- the beat's refresh task: one at a time ---------------------------------------------------------

@pytest.fixture
def refresh_redis(settings):
    from apps.forecasting.tasks import REFRESH_LOCK

    client = redis_db11()   # skips, saying why, when Redis does not answer
    client.delete(REFRESH_LOCK)
    settings.REDIS_URL = REDIS_DB11
    yield client
    client.delete(REFRESH_LOCK)


def recent_day(series: Series) -> None:
    """A day of 10-minute points up to now: too short for Prophet, enough for a forecast."""
    from django.utils import timezone

    end = timezone.now().replace(second=0, microsecond=0)
    SeriesPoint.objects.bulk_create(
        SeriesPoint(series=series, resolution_s=600, ts=end - timedelta(minutes=10 * k), value=10.0 + k % 3)
        for k in range(144))


def test_a_refresh_takes_the_lock_forecasts_and_gives_the_lock_back(cluster_series, refresh_redis):
    from apps.forecasting.tasks import REFRESH_LOCK, refresh

    recent_day(cluster_series)
    result = refresh()
    assert set(result["forecasts"]) == {cluster_series.key}
    assert Forecast.objects.filter(series=cluster_series).count() == 1
    assert not refresh_redis.exists(REFRESH_LOCK)


def test_a_refresh_while_another_runs_is_skipped(cluster_series, refresh_redis):
    from apps.forecasting.tasks import REFRESH_LOCK, refresh

    recent_day(cluster_series)
    running = refresh_redis.lock(REFRESH_LOCK, timeout=60)
    assert running.acquire(blocking=False)
    assert refresh() == {"skipped": "another refresh is running"}
    assert not Forecast.objects.filter(series=cluster_series).exists()
    assert refresh_redis.exists(REFRESH_LOCK)  # still the other one's
    running.release()
    assert set(refresh()["forecasts"]) == {cluster_series.key}


def test_without_redis_the_refresh_still_forecasts(cluster_series, settings, caplog):
    from apps.forecasting.tasks import refresh

    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # port 1: refused at once
    recent_day(cluster_series)
    assert set(refresh()["forecasts"]) == {cluster_series.key}
    assert "refreshing without it" in caplog.text
