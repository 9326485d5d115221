"""The verbs of job life: submit, transition, cancel. Views and tasks call these, never the reverse."""
from __future__ import annotations

from django.db import transaction
from django.utils import timezone

from apps.accounts.compiled import CompiledInsert
from apps.accounts.models import Team

from .models import Allocation, Job, JobEvent
from .signals import job_changed, scheduling_requested
from .states import LIVE, TERMINAL, IllegalTransition, JobState, check_transition

# Submission is the API's hottest write: its two INSERTs are compiled once (apps/accounts/compiled.py).
_INSERT_JOB = CompiledInsert(Job)
_INSERT_EVENT = CompiledInsert(JobEvent)
# A queued job's reason until a pass has seen it; then its QueueEntry's (Job.waiting_reason).
ENTERED_QUEUE_REASON = "Waiting for the scheduler's next pass."


def _after_commit(job: Job, event: JobEvent, *, reschedule: bool) -> None:
    def send() -> None:
        job_changed.send(sender=Job, job=job, event=event)
        if reschedule:
            scheduling_requested.send(sender=Job, reason=f"job {job.pk} {event.to_state or event.kind}")

    transaction.on_commit(send)


def submit_job(
    *,
    submitter,
    team: Team,
    name: str,
    kind: str,
    priority: str = Job.Priority.NORMAL,
    gpus: int = 1,
    nodes: int = 1,
    gpu_memory_gb: float | None = None,
    walltime_minutes: int | None = None,
    spec: dict | None = None,
    depends_on: list[Job] | None = None,
) -> Job:
    """Put a validated job in the queue. Validation (spec, quotas, capacity, dependencies) is the
    serializer's. A job with `depends_on` is held back by the scheduler until those jobs succeed."""
    with transaction.atomic():
        job = _INSERT_JOB.create(
            team=team,
            submitter=submitter,
            name=name,
            kind=kind,
            priority=priority,
            gpus=gpus,
            nodes=nodes,
            gpu_memory_gb=gpu_memory_gb,
            walltime_minutes=walltime_minutes,
            spec=spec or {},
            state=JobState.QUEUED,
            pending_reason=ENTERED_QUEUE_REASON,
        )
        if depends_on:
            job.depends_on.set(depends_on)
        event = _INSERT_EVENT.create(
            job=job, to_state=JobState.QUEUED, attempt=1, message="Submitted.", actor=submitter,
            data={"depends_on": sorted(j.pk for j in depends_on)} if depends_on else {},
        )
        _after_commit(job, event, reschedule=True)
    return job


def transition(
    job: Job | int,
    target: str,
    *,
    message: str = "",
    data: dict | None = None,
    actor=None,
    expected_attempt: int | None = None,
    **fields,
) -> Job:
    """Move a job to `target`, append the event, and release GPUs when the job stops holding them.

    Raises IllegalTransition when the state machine forbids it. `expected_attempt` makes reports from
    a stale attempt fail the same way instead of changing a newer attempt.
    """
    job_id = job if isinstance(job, int) else job.pk
    with transaction.atomic():
        # Lock the row: a worker's report and a user's cancel can arrive at the same moment; both
        # read the state, and without the lock both would write a transition from it.
        locked = Job.objects.select_for_update().get(pk=job_id)
        if expected_attempt is not None and locked.attempt != expected_attempt:
            raise IllegalTransition(
                f"{locked.state} (attempt {locked.attempt})", f"{target} (attempt {expected_attempt})"
            )
        current = locked.state
        check_transition(current, target)
        now = timezone.now()
        locked.state = target
        if target == JobState.RUNNING and locked.started_at is None:
            locked.started_at = now
        if target in TERMINAL:
            locked.finished_at = now
        if target == JobState.QUEUED:
            # A retried or preempted attempt: the old attempt's allocations go, the new attempt starts
            # clean; what it ran counts as served (it resumes from its checkpoint).
            if locked.started_at is not None:
                locked.ran_seconds += max(0.0, (now - locked.started_at).total_seconds())
            if current == JobState.PREEMPTING:
                locked.preemptions += 1
            locked.attempt += 1
            locked.started_at = None
        if target != JobState.QUEUED:
            locked.pending_reason = ""
        else:
            locked.pending_reason = ENTERED_QUEUE_REASON
        for name, value in fields.items():
            setattr(locked, name, value)
        locked.save()
        if target not in LIVE:
            Allocation.objects.filter(job=locked, released_at__isnull=True).update(released_at=now)
        event = JobEvent.objects.create(
            job=locked,
            attempt=locked.attempt,
            from_state=current,
            to_state=target,
            message=message,
            data=data or {},
            actor=actor,
        )
        # A job that gives GPUs back may let another start.
        _after_commit(locked, event, reschedule=target not in LIVE)
    if isinstance(job, Job):
        job.refresh_from_db()
    return locked


def allocate_queued(placements: list[tuple[Job, list[Allocation], str, dict]]) -> list[Job]:
    """Queued -> allocated for many jobs at once: what `transition` writes for each (the state, an empty
    pending reason, the allocations, one event, the signals after the commit), in four statements instead
    of six per job. For the scheduling pass only, inside its transaction: it holds the pass lock and has
    locked the jobs' rows `select_for_update` and checked that they are still queued."""
    if not placements:
        return []
    check_transition(JobState.QUEUED, JobState.ALLOCATED)
    now = timezone.now()
    jobs = [job for job, _, _, _ in placements]
    Allocation.objects.bulk_create([a for _, allocations, _, _ in placements for a in allocations])
    Job.objects.filter(pk__in=[job.pk for job in jobs], state=JobState.QUEUED).update(
        state=JobState.ALLOCATED, pending_reason="", updated_at=now)
    events = JobEvent.objects.bulk_create([
        JobEvent(job=job, attempt=job.attempt, from_state=JobState.QUEUED, to_state=JobState.ALLOCATED,
                 message=message, data=data)
        for job, _, message, data in placements
    ])
    for job, event in zip(jobs, events, strict=True):
        job.state, job.pending_reason, job.updated_at = JobState.ALLOCATED, "", now
        _after_commit(job, event, reschedule=False)
    return jobs


def hold_job(job: Job, *, actor) -> Job:
    """Hold a queued job (like `scontrol hold`): it keeps its place in the queue's history but the scheduler
    starts nothing of it until it is released. Holding a held job changes nothing; a job that has left the
    queue cannot be held (409)."""
    return _set_hold(job, True, actor)


def release_job(job: Job, *, actor) -> Job:
    """Let a held job be scheduled again (like `scontrol release`). Releasing a job that is not held changes
    nothing; a job that has left the queue cannot be released (409)."""
    return _set_hold(job, False, actor)


def _set_hold(job: Job, held: bool, actor) -> Job:  # noqa: ANN001
    with transaction.atomic():
        current = Job.objects.select_for_update().get(pk=job.pk)
        if current.state != JobState.QUEUED:
            raise IllegalTransition(current.state, "held" if held else "released")
        if current.held == held:
            return current
        current.held, current.held_by = held, (actor.username if held else "")
        current.save(update_fields=["held", "held_by", "updated_at"])
        event = _INSERT_EVENT.create(
            job=current, attempt=current.attempt, kind=JobEvent.Kind.NOTE, actor=actor,
            message=f"Held by {actor.username}." if held else f"Released by {actor.username}.",
            data={"held": held},
        )
        _after_commit(current, event, reschedule=True)
    return current


def cancel_job(job: Job, *, actor=None) -> Job:
    """Cancel: a queued job ends at once; a job holding GPUs goes `cancelling` until its worker stops."""
    with transaction.atomic():
        current = Job.objects.select_for_update().values_list("state", flat=True).get(pk=job.pk)
        if current == JobState.QUEUED:
            return transition(job, JobState.CANCELLED, message="Cancelled before it started.", actor=actor)
        if current in (JobState.ALLOCATED, JobState.RUNNING, JobState.PREEMPTING):
            return transition(job, JobState.CANCELLING, message="Cancel requested.", actor=actor)
        raise IllegalTransition(current, JobState.CANCELLED)
