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


REFRESH_LOCK = "deepopt:forecasting:refresh"
REFRESH_TIME_LIMIT_S = 600


@shared_task(name="forecasting.refresh", time_limit=REFRESH_TIME_LIMIT_S, soft_time_limit=540, acks_late=False,
             ignore_result=True)
def refresh() -> dict:
    """New forecasts, then the autoscaler. One at a time: a refresh that outlasts the beat interval (the
    daily refits of many series) must not be joined by the next tick's, which would fit the same models
    twice and take the worker's other slot from the scheduling passes. The lock expires with the task's
    time limit, so a killed worker cannot hold it."""
    import redis
    from django.conf import settings

    from .services import autoscale, refresh_forecasts

    lock = redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=2, socket_timeout=2).lock(
        REFRESH_LOCK, timeout=REFRESH_TIME_LIMIT_S)
    try:
        held = lock.acquire(blocking=False)
    except redis.RedisError:
        held = None  # no Redis to ask: forecast anyway (an overlap is rarer and cheaper than no forecasts)
        log.warning("could not take the forecast-refresh lock in Redis; refreshing without it", exc_info=True)
    if held is False:
        log.info("a forecast refresh is still running; this tick's is skipped")
        return {"skipped": "another refresh is running"}
    try:
        report = refresh_forecasts()
        # The cost of each series' forecast, a refit included: the bound the issue asks to print.
        log.info("forecasts refreshed: %s", report)
        decisions = autoscale()
    finally:
        if held:
            try:
                lock.release()
            except redis.RedisError:  # expired or Redis gone: it lapses by itself
                log.warning("could not release the forecast-refresh lock", exc_info=True)
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
