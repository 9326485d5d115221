"""Ask for a scheduling pass when something may let a job start: a submit, a job end, a node change.

Bursts coalesce: a Redis key marks "a pass is already on its way", so 200 submissions in a second
send a handful of pass messages, not 200. If Redis is down nothing is lost: the beat tick (every 5 s)
runs a pass anyway, and PostgreSQL holds the queue.
"""
from __future__ import annotations

import logging

from django.conf import settings

log = logging.getLogger(__name__)
PENDING_KEY = "deepopt:scheduling:pass-pending"
_redis = None


def _client():  # noqa: ANN202
    global _redis
    if _redis is None:
        import redis

        _redis = redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=0.5, socket_timeout=0.5)
    return _redis


def request_pass(reason: str = "") -> None:
    mode = settings.DEEPOPT_SCHEDULER_TRIGGER
    if mode == "off":
        return
    if mode == "inline":
        from .live import run_pass

        run_pass()
        return
    try:
        if not _client().set(PENDING_KEY, reason or "1", nx=True, ex=10):
            return
        from .tasks import run_pass as task

        task.apply_async(retry=False)
    except Exception:  # noqa: BLE001 - the beat tick recovers; a submission must not fail for this
        log.warning("Could not ask for a scheduling pass (%s); the next tick will run one.", reason, exc_info=True)


def clear_pending() -> None:
    try:
        _client().delete(PENDING_KEY)
    except Exception:  # noqa: BLE001
        log.warning("Could not clear the pending-pass flag.", exc_info=True)


def on_scheduling_requested(sender, reason: str = "", **kwargs) -> None:  # noqa: ANN001
    request_pass(reason)


def on_node_changed(sender, node=None, **kwargs) -> None:  # noqa: ANN001
    request_pass(f"node {getattr(node, 'name', '')} changed")
