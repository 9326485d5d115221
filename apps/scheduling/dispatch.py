"""Send an allocated job attempt to its nodes: one Celery task per node, on the node's own queue.

The scheduling pass commits the allocation; `job_changed` then fires (on commit) and `on_job_changed`
sends the tasks, so a worker never hears of an allocation that was rolled back. Each task carries
everything the node needs without a database: the job's kind and spec, its rank, the world size, the
rendezvous address (the first node's hostname and a port derived from the job and attempt), the GPU
indexes it was given and the whole topology. If the broker is down the send fails quietly and the
reconciler sends again (start_timeout_s later): PostgreSQL, not Redis, holds the truth.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from apps.cluster.models import GpuNode

from .models import Allocation, AttemptRun, Job, JobEvent
from .states import JobState

log = logging.getLogger(__name__)

# The node worker's task (workers/tasks.py), sent by name: the web app never imports worker code.
RUN_ATTEMPT_TASK = "deepopt.run_attempt"


@dataclass(frozen=True)
class RankPlan:
    rank: int
    node: GpuNode
    gpu_indexes: tuple[int, ...]


def plan(job: Job, attempt: int) -> list[RankPlan]:
    """The attempt's nodes in rank order (the order the scheduler allocated them in)."""
    allocations = (Allocation.objects.filter(job=job, attempt=attempt, released_at__isnull=True)
                   .select_related("node", "gpu").order_by("id"))
    nodes: dict[int, tuple[GpuNode, list[int]]] = {}
    for allocation in allocations:
        nodes.setdefault(allocation.node_id, (allocation.node, []))[1].append(allocation.gpu.index)
    return [RankPlan(rank, node, tuple(sorted(indexes))) for rank, (node, indexes) in enumerate(nodes.values())]


def rendezvous_port(job_id: int, attempt: int) -> int:
    config = settings.DEEPOPT_WORKERS
    # Different for each attempt, so a retry never meets a socket its predecessor left in TIME_WAIT.
    return config["rendezvous_port_base"] + (job_id * 16 + attempt) % config["rendezvous_port_span"]


def payloads(job: Job, attempt: int, plans: list[RankPlan]) -> list[dict]:
    world_size = len(plans)
    # The runner sees its GPUs renumbered from 0 (CUDA_VISIBLE_DEVICES), so the topology uses those numbers.
    topology = {"nodes": [{"name": p.node.name, "rack": p.node.rack, "gpus": list(range(len(p.gpu_indexes)))}
                          for p in plans]}
    master = plans[0].node.hostname if plans else ""
    return [
        {
            "job": job.pk, "attempt": attempt, "rank": p.rank, "world_size": world_size, "node": p.node.name,
            # Names the job's files on the node (checkpoints a retry resumes from): ids alone repeat
            # when a development database is recreated.
            "job_key": f"{job.pk}-{int(job.submitted_at.timestamp())}",
            "kind": job.kind, "spec": job.spec, "gpu_indexes": list(p.gpu_indexes),
            "device_type": p.node.device_type, "topology": topology, "master_addr": master,
            "master_port": rendezvous_port(job.pk, attempt), "walltime_minutes": job.walltime_minutes,
        }
        for p in plans
    ]


def dispatch_attempt(job_id: int, attempt: int, *, ranks: list[int] | None = None, reason: str = "",
                     now: datetime | None = None) -> list[int]:
    """Send the attempt's tasks (only `ranks`, if given) and record when; returns the ranks sent.

    Ranks a worker already started are never sent again.
    """
    if settings.DEEPOPT_DISPATCH == "off":
        return []
    job = Job.objects.filter(pk=job_id).first()
    if job is None or job.attempt != attempt or job.state not in (JobState.ALLOCATED, JobState.RUNNING):
        return []
    plans = plan(job, attempt)
    now = now or timezone.now()
    to_send = []
    with transaction.atomic():
        for p in plans:
            if ranks is not None and p.rank not in ranks:
                continue
            run, created = AttemptRun.objects.get_or_create(
                job=job, attempt=attempt, rank=p.rank,
                defaults={"node": p.node, "world_size": len(plans), "dispatched_at": now, "dispatch_count": 1},
            )
            if not created:
                if run.run_id:
                    continue
                AttemptRun.objects.filter(pk=run.pk).update(dispatched_at=now, dispatch_count=F("dispatch_count") + 1)
            to_send.append(p)
        if reason and to_send:
            JobEvent.objects.create(job=job, kind=JobEvent.Kind.NOTE, attempt=attempt, message=reason,
                                    data={"ranks": [p.rank for p in to_send]})
    sent = []
    messages = {m["rank"]: m for m in payloads(job, attempt, plans)}
    try:
        from deepopt_web.celery import app

        with app.connection_for_write(broker_url()) as connection:
            for p in to_send:
                app.send_task(RUN_ATTEMPT_TASK, kwargs={"payload": messages[p.rank]}, queue=p.node.queue_name,
                              connection=connection, retry=False, ignore_result=True)
                sent.append(p.rank)
    except Exception:  # noqa: BLE001 - the reconciler sends again; the allocation must stand
        log.warning("Could not send job %s attempt %s to its nodes; the reconciler will retry.", job_id, attempt,
                    exc_info=True)
    return sent


def broker_url() -> str:
    return getattr(settings, "DEEPOPT_DISPATCH_BROKER_URL", None) or settings.CELERY_BROKER_URL


def on_job_changed(sender, job: Job | None = None, event: JobEvent | None = None, **kwargs) -> None:  # noqa: ANN001
    """Listener of `job_changed` (sent after commit): an attempt that became `allocated` goes to its nodes."""
    if job is None or event is None or event.to_state != JobState.ALLOCATED:
        return
    try:
        dispatch_attempt(job.pk, event.attempt)
    except Exception:  # noqa: BLE001 - runs after the commit; raising here would fail the caller's request
        log.exception("Dispatch of job %s attempt %s failed; the reconciler will retry.", job.pk, event.attempt)
