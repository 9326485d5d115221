"""Bring the cluster back in line with the database (Celery beat, every RECONCILER_INTERVAL_S = 30 s).

Faults it repairs, each with a threshold in settings.DEEPOPT_WORKERS:
- a node whose agent has been silent for `node_silent_s` goes `down`, and the attempts it ran are
  retried (attempt + 1, up to the job's `max_attempts`, then `failed` with the reason);
- a running attempt whose worker stopped reporting for `attempt_silent_s` (the worker was killed, the
  agent still heartbeats) is retried the same way;
- an allocation no worker started within `start_timeout_s` of its dispatch (the message was lost with
  a Redis restart, or the worker was down) is dispatched again, `max_redispatches` times, then retried
  as a new attempt;
- a `cancelling` job whose worker never confirmed within `cancel_timeout_s` is ended, and a `preempting`
  one is requeued (its GPUs released);
- no allocation stays live for a job that no longer holds GPUs.
"""
from __future__ import annotations

import logging
from datetime import datetime, timedelta

from django.conf import settings
from django.db.models import F, Min, Q
from django.utils import timezone

from apps.cluster.agent import heartbeat_interval
from apps.cluster.models import GpuNode
from apps.cluster.services import IllegalNodeTransition, set_node_state

from .dispatch import dispatch_attempt, plan
from .models import Allocation, AttemptRun, Job, JobEvent
from .reports import retry_or_fail
from .services import transition
from .states import LIVE, IllegalTransition, JobState

log = logging.getLogger(__name__)


def reconcile(now: datetime | None = None) -> dict:
    """One round of repairs; returns what it did (ids), for the task's result and for tests."""
    config = settings.DEEPOPT_WORKERS
    now = now or timezone.now()
    done: dict[str, list] = {"nodes_down": [], "retried": [], "redispatched": [], "cancelled": [], "preempted": [],
                             "released": []}
    _silent_nodes(now, config, done)
    _silent_workers(now, config, done)
    _unstarted(now, config, done)
    _stuck_cancels(now, config, done)
    _stuck_preemptions(now, config, done)
    _leaked_allocations(now, done)
    if any(done.values()):
        log.info("Reconciler: %s", {k: v for k, v in done.items() if v})
    return done


def _silent_nodes(now: datetime, config: dict, done: dict) -> None:
    cutoff = now - timedelta(seconds=config["node_silent_s"])
    # A standby node is powered down on purpose (autoscaler): its silence is expected.
    silent = GpuNode.objects.filter(state__in=[GpuNode.State.ACTIVE, GpuNode.State.DRAINING]).filter(
        Q(last_heartbeat_at__lt=cutoff) | Q(last_heartbeat_at__isnull=True, created_at__lt=cutoff))
    reasons = {}
    for node in silent:
        try:
            set_node_state(node, GpuNode.State.DOWN)
        except IllegalNodeTransition:
            continue
        done["nodes_down"].append(node.name)
        since = node.last_heartbeat_at or node.created_at
        reasons[node.pk] = (f"Node {node.name} stopped answering "
                            f"(no heartbeat for {(now - since).total_seconds():.0f} s)")
    # Whatever still holds GPUs on a down node is lost: the node was marked down just now, or went
    # offline itself (its worker shutting down) without handing every attempt back.
    live = (Allocation.objects.filter(node__state=GpuNode.State.DOWN, released_at__isnull=True)
            .values_list("job_id", "attempt", "node_id", "node__name").distinct())
    for job_id, attempt, node_id, name in live:
        if retry_or_fail(job_id, attempt, reasons.get(node_id) or f"Node {name} is down") is not None:
            done["retried"].append(job_id)


def _silent_workers(now: datetime, config: dict, done: dict) -> None:
    cutoff = now - timedelta(seconds=config["attempt_silent_s"])
    quiet = (AttemptRun.objects.filter(started_at__isnull=False, finished_at__isnull=True, seen_at__lt=cutoff,
                                       job__state__in=LIVE)
             .select_related("job", "node"))
    # A node that has also missed three heartbeats in a row is most likely gone with its worker: mark it
    # down before the retry, or the scheduler could place the retry right back on it.
    missing = now - timedelta(seconds=3 * heartbeat_interval())
    for run in quiet:
        AttemptRun.objects.filter(pk=run.pk, finished_at__isnull=True).update(finished_at=now, status="lost")
        if run.job.attempt != run.attempt:
            continue
        node = run.node
        if node.state in (GpuNode.State.ACTIVE, GpuNode.State.DRAINING) and (
                node.last_heartbeat_at is None or node.last_heartbeat_at < missing):
            set_node_state(node, GpuNode.State.DOWN)
            done["nodes_down"].append(node.name)
        silent_s = (now - run.seen_at).total_seconds()
        reason = (f"The worker running attempt {run.attempt} on {run.node.name} stopped reporting "
                  f"({silent_s:.0f} s without a word)")
        if retry_or_fail(run.job_id, run.attempt, reason) is not None:
            done["retried"].append(run.job_id)


def _unstarted(now: datetime, config: dict, done: dict) -> None:
    timeout = timedelta(seconds=config["start_timeout_s"])
    live = Q(allocations__released_at__isnull=True)
    candidates = (Job.objects.filter(state__in=[JobState.ALLOCATED, JobState.RUNNING])
                  .annotate(allocated_at=Min("allocations__created_at", filter=live))
                  .filter(allocated_at__lt=now - timeout))
    for job in candidates:
        runs = {r.rank: r for r in AttemptRun.objects.filter(job=job, attempt=job.attempt)}
        waiting, exhausted = [], False
        for rank_plan in plan(job, job.attempt):
            run = runs.get(rank_plan.rank)
            if run is not None and run.run_id:
                continue  # started
            sent_at = run.dispatched_at if run is not None and run.dispatched_at else job.allocated_at
            if now - sent_at < timeout:
                continue
            if run is not None and run.dispatch_count > config["max_redispatches"]:
                exhausted = True
            waiting.append(rank_plan)
        if not waiting:
            continue
        names = ", ".join(sorted({p.node.name for p in waiting}))
        if exhausted:
            reason = (f"No worker on {names} started attempt {job.attempt} after "
                      f"{config['max_redispatches'] + 1} dispatches")
            if retry_or_fail(job.pk, job.attempt, reason) is not None:
                done["retried"].append(job.pk)
            continue
        sent = dispatch_attempt(job.pk, job.attempt, ranks=[p.rank for p in waiting], now=now,
                                reason=f"Not started within {timeout.total_seconds():.0f} s; sent to {names} again.")
        if sent:
            done["redispatched"].append(job.pk)


def _stuck_cancels(now: datetime, config: dict, done: dict) -> None:
    cutoff = now - timedelta(seconds=config["cancel_timeout_s"])
    for job in Job.objects.filter(state=JobState.CANCELLING, updated_at__lt=cutoff):
        try:
            transition(job, JobState.CANCELLED, expected_attempt=job.attempt,
                       message=f"No worker confirmed the cancel within {config['cancel_timeout_s']:.0f} s; "
                               "the GPUs are released.")
        except IllegalTransition:
            continue
        done["cancelled"].append(job.pk)


def _stuck_preemptions(now: datetime, config: dict, done: dict) -> None:
    cutoff = now - timedelta(seconds=config["cancel_timeout_s"])
    for job in Job.objects.filter(state=JobState.PREEMPTING, updated_at__lt=cutoff):
        if retry_or_fail(job.pk, job.attempt,
                         f"No worker confirmed the preemption within {config['cancel_timeout_s']:.0f} s; "
                         "the GPUs are released") is not None:
            done["preempted"].append(job.pk)


def _leaked_allocations(now: datetime, done: dict) -> None:
    # transition() releases GPUs when a job stops holding them; this is the safety net for anything that
    # bypassed it (a manual database edit, a crash between two writes).
    leaked = Allocation.objects.filter(released_at__isnull=True).exclude(job__state__in=LIVE)
    stale = Allocation.objects.filter(released_at__isnull=True, job__state__in=LIVE).exclude(attempt=F("job__attempt"))
    for queryset in (leaked, stale):
        rows = list(queryset.values_list("pk", "job_id", "attempt"))
        if not rows:
            continue
        Allocation.objects.filter(pk__in=[pk for pk, _, _ in rows]).update(released_at=now)
        for job_id, attempt in sorted({(job, attempt) for _, job, attempt in rows}):
            JobEvent.objects.create(job_id=job_id, kind=JobEvent.Kind.NOTE, attempt=attempt,
                                    message=f"Released GPUs left allocated to attempt {attempt}, which no longer runs.")
            done["released"].append(job_id)
