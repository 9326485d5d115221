"""The Celery app of a node's worker: `celery -A workers.celery_app worker -Q node.<name> --pool threads`.

It needs no database and no Django: only the broker (DEEPOPT_BROKER_URL, else REDIS_URL) to receive
`deepopt.run_attempt` messages, and the web app's agent API (DEEPOPT_SERVER + the node token) to report.
The agent (`python -m workers.agent`) starts it with the right queue and environment.
"""
from __future__ import annotations

import os

from celery import Celery

DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"


def broker_url() -> str:
    return os.environ.get("DEEPOPT_BROKER_URL") or os.environ.get("REDIS_URL") or DEFAULT_BROKER_URL


app = Celery("deepopt-node", include=["workers.tasks"])
app.conf.update(
    broker_url=broker_url(),
    broker_connection_retry_on_startup=True,
    accept_content=["json"],
    task_serializer="json",
    result_serializer="json",
    task_ignore_result=True,
    result_backend=None,
    # A message is acknowledged only when its attempt is over, one message at a time per free slot:
    # a worker lost mid-attempt leaves it unacknowledged for redelivery, and the claim (reports.py)
    # keeps a redelivered attempt from running twice.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    # Attempts last as long as their walltime, which the task enforces itself.
    task_time_limit=None,
    task_soft_time_limit=None,
    worker_hijack_root_logger=True,
    worker_redirect_stdouts=False,
)
