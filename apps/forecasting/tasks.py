"""Forecasting tasks (beat): thin wrappers over series.py and services.py."""
from __future__ import annotations

import logging

from celery import shared_task

log = logging.getLogger(__name__)


@shared_task(name="forecasting.rollup", time_limit=60, soft_time_limit=50, acks_late=False, ignore_result=True)
def rollup() -> dict:
    from .series import downsample, rollup_minute

    written = rollup_minute()
    return {"points": written, "downsampled": downsample()}


@shared_task(name="forecasting.refresh", time_limit=600, soft_time_limit=540, acks_late=False, ignore_result=True)
def refresh() -> dict:
    from .services import autoscale, refresh_forecasts

    report = refresh_forecasts()
    # The cost of each series' forecast, a refit included: the bound the issue asks to print.
    log.info("forecasts refreshed: %s", report)
    decisions = autoscale()
    return {"forecasts": report, "decisions": [d.pk for d in decisions]}


# soft_time_limit too: the app-wide soft limit (a day) above a task's own hard limit makes apply_async refuse
# to queue the task at all (tests/unit/test_job_webhooks.py queues both webhook tasks).
@shared_task(name="forecasting.post_webhook", time_limit=30, soft_time_limit=25, acks_late=False,
             ignore_result=True, autoretry_for=(ConnectionError,), max_retries=3)
def post_scaling_webhook(decision_id: int) -> str:
    from .models import AutoscalerPolicy, ScalingDecision
    from .services import post_webhook

    decision = ScalingDecision.objects.select_related("forecast").filter(pk=decision_id).first()
    url = AutoscalerPolicy.current().webhook_url
    if decision is None or not url:
        return "skipped"
    return post_webhook(decision, url)
