"""Scheduling tasks: thin wrappers over apps.scheduling.live."""
from __future__ import annotations

from celery import shared_task


@shared_task(name="scheduling.run_pass", time_limit=120, soft_time_limit=100, acks_late=False, ignore_result=True)
def run_pass() -> dict:
    from .live import run_pass as live_pass
    from .triggers import clear_pending

    # Cleared before the pass reads its snapshot, so an event during the pass asks for another one.
    clear_pending()
    result = live_pass()
    return {"placed": result.placed, "queued": result.queued, "pass_ms": round(result.pass_ms, 1)}


@shared_task(name="scheduling.reconcile", time_limit=120, soft_time_limit=100, acks_late=False, ignore_result=True)
def reconcile() -> dict:
    from .reconciler import reconcile as run

    return run()


@shared_task(name="scheduling.post_job_webhook", time_limit=60, soft_time_limit=50, acks_late=False,
             ignore_result=True)
def post_job_webhook(job_id: int) -> str:
    """A finished job to its team's webhook (notify.py)."""
    from .notify import post

    return post(job_id)
