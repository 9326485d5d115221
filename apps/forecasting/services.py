"""Forecasting verbs: refresh the forecasts of the series that matter, and let the autoscaler act on them.

Cost is bounded per series: the forecaster's Prophet model is refitted on its own schedule (once a
day by default) and cached in `ForecasterState`; between refits a forecast is one Prophet predict
plus the residual correction (tens of milliseconds). Each `Forecast` row records what it cost.
"""
from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta

import pandas as pd
from django.db import transaction
from django.db.models import Exists, Max, OuterRef, Subquery
from django.utils import timezone

from apps.cluster.models import GpuNode
from apps.cluster.services import set_node_state
from apps.scheduling.models import Allocation, Job
from apps.scheduling.states import JobState

from . import autoscaler
from .models import AutoscalerPolicy, Forecast, ForecasterState, ScalingDecision, Series
from .series import ALLOCATED, CLUSTER_KEY, QUEUED, UTILIZATION, histories

log = logging.getLogger(__name__)

STEP = timedelta(minutes=5)
# 5-minute steps for the first two hours, then every 15 minutes to a day: 112 points per forecast.
HORIZONS = [STEP * k for k in range(1, 25)] + [timedelta(minutes=15) * k for k in range(9, 97)]
HISTORY = timedelta(days=28)
MIN_POINTS = 12  # an hour of data before a series gets a forecast
FORECAST_KEEP = timedelta(days=2)


def forecast_worthy() -> list[Series]:
    """The series that get forecasts: the cluster's three, each rack's and each team's allocated GPUs,
    each team's queued demand. Racks and teams are few; per-GPU series are not forecast."""
    wanted = [CLUSTER_KEY.format(metric=m) for m in (ALLOCATED, QUEUED, UTILIZATION)]
    return list(Series.objects.filter(key__in=wanted)) + list(
        Series.objects.filter(scope__in=["rack", "team"], metric=ALLOCATED)
    ) + list(Series.objects.filter(scope="team", metric=QUEUED))


def forecast_series(series: Series, now: datetime | None = None) -> Forecast | None:
    """One new forecast for `series` from its data up to `now`; None while it has too little data."""
    from .forecaster import LoadForecaster  # pandas and Prophet: loaded by the processes that forecast only

    now = now or timezone.now()
    began = time.perf_counter()
    latest: dict = {}
    data = histories([series], step=STEP, since=now - HISTORY, until=now, latest=latest)[series.pk]
    if data.notna().sum() < MIN_POINTS:
        return None
    end = data.last_valid_index()
    data, last_sample = data.loc[:end], latest[series.pk].loc[:end]
    cached = ForecasterState.objects.filter(series=series).first()
    forecaster = None
    if cached is not None:
        try:
            forecaster = LoadForecaster.load(cached.state)
        except ValueError:  # a state from an older forecaster version: start afresh (a refit)
            log.info("forecaster state of %s is from another version; refitting", series.key)
    forecaster = forecaster or LoadForecaster(pd.Timedelta(STEP))
    fit_before = forecaster.fit_seconds
    refitted = forecaster.update(data, last_sample)
    path = forecaster.forecast(data, [pd.Timedelta(h) for h in HORIZONS], last_sample)
    upper_bound = series.metric == UTILIZATION and 100.0
    points = []
    for ts, yhat, low, high in zip(path.times, path.yhat, path.lower, path.upper, strict=True):
        values = [max(0.0, float(v)) for v in (yhat, low, high)]
        if upper_bound:
            values = [min(upper_bound, v) for v in values]
        points.append([ts.tz_localize("UTC").isoformat(), *(round(v, 3) for v in values)])
    with transaction.atomic():
        if refitted or cached is None:
            fit_total = (cached.fit_seconds_total if cached else 0.0) + forecaster.fit_seconds - fit_before
            ForecasterState.objects.update_or_create(series=series, defaults={
                # Without the Prophet model itself (1.5 MB at 28 days of 5-minute steps): its seasonal
                # table and the corrections are all a forecast needs; a refit fits a new model anyway.
                "state": forecaster.dump(include_model=False), "fitted_at": now, "fit_seconds_total": fit_total,
                "refits": (cached.refits if cached else 0) + int(refitted),
            })
        elif forecaster.options["band_tracking"] > 0:
            # The bands' tracked offsets moved with the errors seen since the last forecast: keep them,
            # so the next forecast scores only the newer ones.
            ForecasterState.objects.filter(pk=cached.pk).update(state=forecaster.dump(include_model=False))
        forecast = Forecast.objects.create(
            series=series, origin=path.origin.tz_localize("UTC").to_pydatetime(), step_s=int(STEP.total_seconds()),
            method=path.method[:80], points=points, refitted=refitted, compute_s=time.perf_counter() - began,
            track_record=forecaster.track_record(),
        )
    _announce_forecast(series, forecast)
    return forecast


def _announce_forecast(series: Series, forecast: Forecast) -> None:
    from apps.dashboard.events import CLUSTER, publish, team_group

    groups = [team_group(series.team_id)] if series.scope == Series.Scope.TEAM else [CLUSTER]
    publish(groups, "forecast.updated", forecast_summary(forecast, series))


def forecast_summary(forecast: Forecast, series: Series | None = None) -> dict:
    series = series or forecast.series
    return {"series": series.key, "label": series.label, "origin": forecast.origin.isoformat(),
            "method": forecast.method, "points": forecast.points}


def refresh_forecasts(now: datetime | None = None) -> dict:
    """Forecast every worthy series; return what each cost (the beat task logs it)."""
    now = now or timezone.now()
    report = {}
    for series in forecast_worthy():
        try:
            forecast = forecast_series(series, now)
        except Exception:  # one bad series must not stop the others' forecasts
            log.exception("forecast of %s failed", series.key)
            report[series.key] = {"error": True}
            continue
        if forecast is not None:
            report[series.key] = {"compute_s": round(forecast.compute_s, 3), "refitted": forecast.refitted,
                                  "method": forecast.method}
    Forecast.objects.filter(created_at__lt=now - FORECAST_KEEP).delete()
    return report


def latest_forecasts(series_ids: list[int]) -> dict[int, Forecast]:
    """The newest forecast of each series, in one query."""
    newest = Forecast.objects.filter(series=OuterRef("series_id")).order_by("-origin").values("pk")[:1]
    return {f.series_id: f for f in Forecast.objects.filter(series_id__in=series_ids, pk=Subquery(newest))}


def latest_forecast(key: str, *, max_age: timedelta | None = None, now: datetime | None = None) -> Forecast | None:
    forecast = Forecast.objects.filter(series__key=key).order_by("-origin").first()
    if forecast and max_age is not None and forecast.origin < (now or timezone.now()) - max_age:
        return None
    return forecast


def _config(policy: AutoscalerPolicy) -> autoscaler.AutoscalerConfig:
    return autoscaler.AutoscalerConfig(
        scale_up_at=policy.scale_up_at, scale_down_below=policy.scale_down_below,
        below_for_s=policy.below_for_minutes * 60, cooldown_s=policy.cooldown_minutes * 60,
        min_active_nodes=policy.min_active_nodes)


def autoscale(now: datetime | None = None) -> list[ScalingDecision]:
    """Apply the autoscaler's rule to the latest cluster forecast; record and announce what it did."""
    now = now or timezone.now()
    with transaction.atomic():
        # One autoscaler at a time: the policy row is the lock (two beat ticks could overlap).
        AutoscalerPolicy.objects.get_or_create(pk=1)
        policy = AutoscalerPolicy.objects.select_for_update().get(pk=1)
        if not policy.enabled:
            return []
        forecast = latest_forecast(CLUSTER_KEY.format(metric=ALLOCATED), max_age=timedelta(minutes=15), now=now)
        if forecast is None:
            return []
        horizon_s = policy.horizon_minutes * 60
        peak = forecast.peak(horizon_s)
        busy = Allocation.objects.filter(node=OuterRef("pk"), released_at__isnull=True)
        nodes = list(GpuNode.objects.annotate(busy=Exists(busy)).prefetch_related("gpus"))
        views = [autoscaler.NodeView(n.name, len(n.gpus.all()), n.state, n.busy) for n in nodes]
        last = ScalingDecision.objects.order_by("-created_at").values_list("created_at", flat=True).first()
        # A job larger than the active nodes allocates nothing, so no forecast would ever ask for the
        # nodes it needs: the largest queued job is a floor under the active capacity.
        largest = Job.objects.filter(state=JobState.QUEUED).aggregate(g=Max("gpus"))["g"] or 0
        plan = autoscaler.plan(
            views, peak, now.timestamp(),
            low_since=policy.low_since.timestamp() if policy.low_since else None,
            last_change_at=last.timestamp() if last else None, config=_config(policy), min_capacity=largest)
        policy.low_since = datetime.fromtimestamp(plan.low_since, tz=UTC) if plan.low_since else None
        policy.save(update_fields=["low_since", "updated_at"])
        decisions = []
        by_name = {n.name: n for n in nodes}
        for name in plan.nodes:
            node = by_name[name]
            if plan.action == ScalingDecision.Action.STANDBY:
                # The node was idle when the snapshot was read; a pass may have placed a job since.
                locked = GpuNode.objects.select_for_update().get(pk=node.pk)
                if Allocation.objects.filter(node=locked, released_at__isnull=True).exists():
                    continue
            set_node_state(node, GpuNode.State.STANDBY if plan.action == "standby" else GpuNode.State.ACTIVE)
            decisions.append(ScalingDecision.objects.create(
                action=plan.action, node=node, node_name=name, reason=plan.reason[:300], forecast=forecast,
                forecast_peak=peak, active_capacity=plan.capacity))
        for decision in decisions:
            transaction.on_commit(lambda d=decision: _after_decision(d))
    return decisions


def _after_decision(decision: ScalingDecision) -> None:
    from apps.dashboard.events import STAFF, publish, team_group

    data = decision_summary(decision)
    node = decision.node
    publish([STAFF] + ([team_group(node.team_id)] if node else []), "scaling.decision", data)
    if AutoscalerPolicy.current().webhook_url:
        from .tasks import post_scaling_webhook

        post_scaling_webhook.delay(decision.pk)


def decision_summary(decision: ScalingDecision) -> dict:
    return {"id": decision.pk, "action": decision.action, "node": decision.node_name, "reason": decision.reason,
            "forecast_peak": round(decision.forecast_peak, 2), "active_capacity": decision.active_capacity,
            "forecast_origin": decision.forecast.origin.isoformat() if decision.forecast else None,
            "at": decision.created_at.isoformat()}


def post_webhook(decision: ScalingDecision, url: str, timeout: float = 5.0) -> str:
    """POST the decision to an external provisioner; return and record what came back."""
    import requests

    try:
        response = requests.post(url, json={"event": "scaling.decision", **decision_summary(decision)},
                                 timeout=timeout)
        status = f"HTTP {response.status_code}"
    except requests.RequestException as exc:
        status = f"error: {type(exc).__name__}"[:80]
    ScalingDecision.objects.filter(pk=decision.pk).update(webhook_status=status)
    return status
