"""The load charts' data: observed history and the latest forecast of a series, ready for plotly.

Pages embed it with `json_script`; live.js's `forecast.updated` event makes the chart fetch the same
shape again from `/api/v1/forecasts/{id}/`. Team series are only built for the series' team (the
callers pass series from `visible_series`)."""
from __future__ import annotations

from datetime import timedelta

import pandas as pd
from django.db.models import Exists, OuterRef
from django.utils import timezone

from apps.cluster.services import active_gpus
from apps.forecasting.models import AutoscalerPolicy, Forecast, ScalingDecision, Series, SeriesPoint
from apps.forecasting.series import ALLOCATED, CLUSTER_KEY, QUEUED, histories
from apps.forecasting.services import STEP, latest_forecasts

CHART_HOURS = 24


def chart_payloads(series: list[Series], *, hours: int = CHART_HOURS, capacity_of: dict | None = None,
                   policy: AutoscalerPolicy | None = None) -> list[dict]:
    """Charts of several series: two queries in all (their points, their latest forecasts). A chart
    with a capacity also gets the autoscaler's lines from `policy` (the caller's, read once per page)."""
    now = timezone.now()
    observed = histories(series, step=STEP, since=now - timedelta(hours=hours), until=now)
    forecasts = latest_forecasts([s.pk for s in series])
    lines = autoscaler_lines(policy)
    return [chart_payload(s, observed[s.pk].dropna(), forecasts.get(s.pk), (capacity_of or {}).get(s.key), lines)
            for s in series]


def autoscaler_lines(policy: AutoscalerPolicy | None) -> dict | None:
    """The shares of active capacity at which the autoscaler acts, while it is on: the capacity chart
    draws them, so the forecast's crossing of a line is what a decision below the chart reports."""
    if policy is None or not policy.enabled:
        return None
    return {"scale_up_at": policy.scale_up_at, "scale_down_below": policy.scale_down_below}


def chart_payload(series: Series, observed: pd.Series, forecast: Forecast | None, capacity: int | None,
                  autoscaler: dict | None = None) -> dict:
    payload = {
        "id": series.pk, "key": series.key, "label": series.label, "metric": series.metric,
        "history": {"t": [t.tz_localize("UTC").isoformat() for t in observed.index],
                    "y": [round(float(v), 3) for v in observed.to_numpy()]},
        "forecast": None, "capacity": capacity, "autoscaler": autoscaler if capacity is not None else None,
    }
    if forecast is not None:
        payload["forecast"] = {
            "origin": forecast.origin.isoformat(), "method": forecast.method,
            "compute_s": round(forecast.compute_s, 3), "refitted": forecast.refitted,
            "track_record": forecast.track_record,
            "t": [p[0] for p in forecast.points], "yhat": [p[1] for p in forecast.points],
            "lower": [p[2] for p in forecast.points], "upper": [p[3] for p in forecast.points],
        }
    return payload


def cluster_charts(user, policy: AutoscalerPolicy | None = None) -> list[dict]:  # noqa: ANN001
    """The dashboard's charts: the cluster's allocated GPUs (with active capacity and, from `policy`, the
    autoscaler's lines) and queued demand."""
    keys = [CLUSTER_KEY.format(metric=ALLOCATED), CLUSTER_KEY.format(metric=QUEUED)]
    by_key = {s.key: s for s in Series.objects.filter(key__in=keys)}
    series = [by_key[k] for k in keys if k in by_key]
    return chart_payloads(series, capacity_of={keys[0]: active_gpus()}, policy=policy) if series else []


def team_charts(team) -> list[dict]:  # noqa: ANN001
    """The team page's charts: the team's allocated GPUs and queued demand, where they have points (the
    roll-up writes them from the team's first minute on; the seeded demo history is the cluster's)."""
    series = list(Series.objects.filter(scope=Series.Scope.TEAM, team=team, metric__in=[ALLOCATED, QUEUED])
                  .filter(Exists(SeriesPoint.objects.filter(series=OuterRef("pk")))).order_by("key"))
    return chart_payloads(series) if series else []


def all_charts(user, policy: AutoscalerPolicy | None = None) -> list[dict]:  # noqa: ANN001
    """Every series the user may see that has a forecast or points (the forecasts page); the cluster's
    allocated GPUs with the capacity and the autoscaler's lines from `policy`."""
    has_data = (Exists(Forecast.objects.filter(series=OuterRef("pk")))
                | Exists(SeriesPoint.objects.filter(series=OuterRef("pk"))))
    series = list(Series.objects.visible_to(user).filter(has_data).select_related("team")
                  .order_by("scope", "key"))
    return chart_payloads(series, capacity_of={CLUSTER_KEY.format(metric=ALLOCATED): active_gpus()}, policy=policy)


def recent_decisions(user, limit: int = 10) -> list[ScalingDecision]:  # noqa: ANN001
    return list(ScalingDecision.objects.visible_to(user).select_related("forecast").order_by("-created_at", "-id")
                [:limit])


def autoscaler_policy() -> AutoscalerPolicy:
    return AutoscalerPolicy.current()


def load_context(user) -> dict:  # noqa: ANN001
    """What the dashboard adds for its load section: charts, the latest decisions, the autoscaler's switch."""
    policy = autoscaler_policy()
    return {"load_charts": cluster_charts(user, policy), "decisions": recent_decisions(user, limit=5),
            "autoscaler": policy}
