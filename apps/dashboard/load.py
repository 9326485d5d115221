"""The load charts' data: observed history and the latest forecast of a series, ready for plotly.

Pages embed it with `json_script`; live.js's `forecast.updated` event makes the chart fetch the same
shape again from `/api/v1/forecasts/{id}/`. Team series are only built for the series' team (the
callers pass series from `visible_series`)."""
from __future__ import annotations

from datetime import timedelta

from django.db.models import Q
from django.utils import timezone

from apps.cluster.models import Gpu, GpuNode
from apps.forecasting.api.views import visible_series
from apps.forecasting.models import AutoscalerPolicy, Forecast, ScalingDecision, Series
from apps.forecasting.series import ALLOCATED, CLUSTER_KEY, QUEUED, history
from apps.forecasting.services import STEP

CHART_HOURS = 24


def chart_payload(series: Series, *, hours: int = CHART_HOURS, capacity: int | None = None) -> dict:
    now = timezone.now()
    observed = history(series, step=STEP, since=now - timedelta(hours=hours), until=now).dropna()
    forecast = Forecast.objects.filter(series=series).order_by("-origin").first()
    payload = {
        "id": series.pk, "key": series.key, "label": series.label, "metric": series.metric,
        "history": {"t": [t.tz_localize("UTC").isoformat() for t in observed.index],
                    "y": [round(float(v), 3) for v in observed.to_numpy()]},
        "forecast": None, "capacity": capacity,
    }
    if forecast is not None:
        payload["forecast"] = {
            "origin": forecast.origin.isoformat(), "method": forecast.method,
            "compute_s": round(forecast.compute_s, 3), "refitted": forecast.refitted,
            "t": [p[0] for p in forecast.points], "yhat": [p[1] for p in forecast.points],
            "lower": [p[2] for p in forecast.points], "upper": [p[3] for p in forecast.points],
        }
    return payload


def active_capacity() -> int:
    return Gpu.objects.filter(node__state=GpuNode.State.ACTIVE).count()


def cluster_charts(user) -> list[dict]:  # noqa: ANN001
    """The dashboard's charts: the cluster's allocated GPUs (with active capacity) and queued demand."""
    keys = [CLUSTER_KEY.format(metric=ALLOCATED), CLUSTER_KEY.format(metric=QUEUED)]
    by_key = {s.key: s for s in Series.objects.filter(key__in=keys)}
    charts = []
    for key in keys:
        if key in by_key:
            capacity = active_capacity() if key.endswith(ALLOCATED) else None
            charts.append(chart_payload(by_key[key], capacity=capacity))
    return charts


def all_charts(user) -> list[dict]:  # noqa: ANN001
    """Every series the user may see that has a forecast or points (the forecasts page)."""
    series = Series.objects.filter(visible_series(user)).filter(
        Q(forecasts__isnull=False) | Q(points__isnull=False)).distinct().select_related("team").order_by("scope", "key")
    capacity = active_capacity()
    return [chart_payload(s, capacity=capacity if s.key == CLUSTER_KEY.format(metric=ALLOCATED) else None)
            for s in series]


def recent_decisions(user, limit: int = 10) -> list[ScalingDecision]:  # noqa: ANN001
    decisions = ScalingDecision.objects.select_related("forecast").order_by("-created_at", "-id")
    if not user.is_staff:
        from apps.accounts.permissions import team_ids_of

        decisions = decisions.filter(node__team_id__in=team_ids_of(user))
    return list(decisions[:limit])


def autoscaler_policy() -> AutoscalerPolicy:
    return AutoscalerPolicy.current()


def load_context(user) -> dict:  # noqa: ANN001
    """What the dashboard adds for its load section: charts, the latest decisions, the autoscaler's switch."""
    return {"load_charts": cluster_charts(user), "decisions": recent_decisions(user, limit=5),
            "autoscaler": autoscaler_policy()}
