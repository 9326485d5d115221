"""Cluster tasks. Thin: they take ids or plain values and call services."""
from __future__ import annotations

import os
import socket

from celery import shared_task


@shared_task(name="cluster.ping", time_limit=30, soft_time_limit=25)
def ping(payload: dict | None = None) -> dict:
    """Round-trip check of the broker and a worker: answers with who ran it and echoes the payload."""
    return {"pong": True, "hostname": socket.gethostname(), "pid": os.getpid(), "echo": payload or {}}
