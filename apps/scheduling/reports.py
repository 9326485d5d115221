"""What a node's worker reports about a job attempt: claim and progress, status polls, result, artifacts.

Every report names the job, the attempt, the rank and the worker's run id, and each is idempotent:
- a report about a job the node never held is refused (`NotYours`, 404), so a node token can say
  nothing about other nodes' jobs;
- a report about an older attempt, about a job that has ended, or repeated (a progress `seq` already
  seen, a second result) changes nothing and is answered `ignored` (200) with `stop: true`, so the
  worker stops what it runs and does not retry;
- a second run claiming an attempt rank that another run started (the same message delivered twice)
  is a `Conflict` (409): only the first run may execute it.
The job row is locked for each report (`select_for_update`): a worker's report and a user's cancel,
or two ranks' results, can arrive at the same moment.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass
from datetime import timedelta

from django.conf import settings
from django.core.files.uploadedfile import UploadedFile
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from apps.cluster.models import GpuNode
from apps.dashboard import fanout

from .models import Allocation, AttemptRun, Job, JobArtifact, JobEvent
from .services import transition
from .signals import job_changed
from .states import LIVE, STOPPING, TERMINAL, IllegalTransition, JobState

log = logging.getLogger(__name__)

MAX_LINES_PER_REPORT = 200
STDERR_LINES_KEPT = 30
SEEN_WRITE_EVERY = timedelta(seconds=5)  # status polls come each second; the row needs not be touched as often


class NotYours(Exception):
    """The node holds no allocation of this job (or of this attempt): answered 404."""


class Conflict(Exception):
    """Another run already holds this attempt rank: answered 409."""


@dataclass
class Answer:
    status: str  # "accepted" | "ignored"
    state: str
    stop: bool = False
    reason: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def _lock_job(node: GpuNode, job_id: int) -> Job:
    job = Job.objects.select_for_update().filter(pk=job_id).first()
    if job is None or not Allocation.objects.filter(job_id=job_id, node=node).exists():
        raise NotYours
    return job


def _stale(job: Job, node: GpuNode, attempt: int) -> str:
    """Why a report about `attempt` can change nothing, or "" when it is about the live attempt."""
    if attempt != job.attempt:
        return f"attempt {attempt} is stale: the job is on attempt {job.attempt}"
    if not Allocation.objects.filter(job=job, attempt=attempt, node=node).exists():
        raise NotYours
    if job.state in TERMINAL:
        return f"the job has ended ({job.state})"
    return ""


def _run_for(job: Job, node: GpuNode, attempt: int, rank: int, run_id: str) -> AttemptRun:
    run = AttemptRun.objects.select_for_update().filter(job=job, attempt=attempt, rank=rank).first()
    if run is None:
        # The dispatcher records runs after the commit; a fast worker may report first.
        run = AttemptRun(job=job, attempt=attempt, rank=rank, node=node)
    elif run.node_id != node.pk:
        raise NotYours
    if run.run_id and run.run_id != run_id:
        raise Conflict(f"Attempt {attempt} rank {rank} is already being run (run {run.run_id[:8]}); "
                       "this delivery must not run it again.")
    return run


def summarize(line: dict) -> str:
    """A short message for a progress line: what a person scanning the history wants to see."""
    # "step" and "progress" only say that this is a progress line: what follows says which.
    parts = [str(line[key])[:40] for key in ("type", "stage")
             if isinstance(line.get(key), str) and not (key == "type" and line[key] in ("step", "progress"))]
    if "step" in line:
        total = line.get("steps")
        parts.append(f"step {line['step']}" + (f"/{total}" if total is not None else ""))
    if _number(line.get("pct")):
        parts.append(f"{line['pct']:g}%")
    for key in ("loss", "estimate", "quality"):
        if _number(line.get(key)):
            parts.append(f"{key} {line[key]:.6g}")
    if isinstance(line.get("message"), str):
        parts.append(line["message"][:200])
    return ", ".join(parts) or "progress"


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def progress(node: GpuNode, job_id: int, attempt: int, *, rank: int, run_id: str, seq: int,
             lines: list[dict], pid: int | None = None) -> Answer:
    """A batch of the runner's progress lines. The first report of a run claims the attempt rank and
    moves an `allocated` job to `running`."""
    with transaction.atomic():
        job = _lock_job(node, job_id)
        stale = _stale(job, node, attempt)
        if stale:
            return Answer("ignored", job.state, stop=True, reason=stale)
        run = _run_for(job, node, attempt, rank, run_id)
        now = timezone.now()
        if not run.run_id:
            run.run_id, run.started_at, run.pid = run_id, now, pid
        elif seq <= run.last_seq:
            return Answer("ignored", job.state, stop=job.state in STOPPING,
                          reason=f"report {seq} was already received")
        run.last_seq, run.seen_at = seq, now
        run.save()
        if job.state == JobState.ALLOCATED:
            job = transition(job, JobState.RUNNING, expected_attempt=attempt,
                             message=f"Started on {node.name}" + (f" (rank {rank})." if run.world_size > 1 else "."),
                             data={"node": node.name, "rank": rank, "pid": pid})
        events = [JobEvent(job=job, kind=JobEvent.Kind.PROGRESS, attempt=attempt, message=summarize(line),
                           data={**line, "rank": rank} if run.world_size > 1 else line)
                  for line in lines[-MAX_LINES_PER_REPORT:]]
        if events:
            JobEvent.objects.bulk_create(events)
            fanout.job_progress(job, attempt, lines[-MAX_LINES_PER_REPORT:], rank=rank)  # live job page
            latest = events[-1]
            transaction.on_commit(lambda: job_changed.send(sender=Job, job=job, event=latest))
        return Answer("accepted", job.state, stop=job.state in STOPPING)


def attempt_status(node: GpuNode, items: list[dict]) -> list[dict]:
    """The worker's poll (about once a second) of the attempts it runs: continue, or stop and why.

    Doubles as the worker's sign of life: the reconciler requeues attempts whose worker went quiet.
    """
    now = timezone.now()
    jobs = Job.objects.in_bulk({item["job"] for item in items})
    held = set(Allocation.objects.filter(job_id__in=list(jobs), node=node).values_list("job_id", "attempt"))
    runs = {(r.job_id, r.attempt, r.rank): r for r in AttemptRun.objects.filter(job_id__in=list(jobs), node=node)}
    answers, alive = [], []
    for item in items:
        job = jobs.get(item["job"])
        key = (item["job"], item["attempt"], item.get("rank", 0))
        run = runs.get(key)
        reason = ""
        if job is None or (item["job"], item["attempt"]) not in held:
            reason = "this node holds no such attempt"
        elif item["attempt"] != job.attempt:
            reason = f"attempt {item['attempt']} is stale: the job is on attempt {job.attempt}"
        elif job.state in TERMINAL:
            reason = f"the job has ended ({job.state})"
        elif job.state == JobState.CANCELLING:
            reason = "cancel requested"
        elif job.state == JobState.PREEMPTING:
            reason = "preempted by the scheduler; the job goes back to the queue and resumes from its checkpoint"
        elif run is not None and run.run_id and item.get("run") and run.run_id != item["run"]:
            reason = "another run holds this attempt"
        elif run is not None:
            alive.append(run.pk)
        answers.append({"job": item["job"], "attempt": item["attempt"], "rank": item.get("rank", 0),
                        "state": job.state if job is not None and not reason.startswith("this node") else None,
                        "action": "stop" if reason else "continue", "reason": reason})
    if alive:
        AttemptRun.objects.filter(pk__in=alive).filter(
            Q(seen_at__isnull=True) | Q(seen_at__lt=now - SEEN_WRITE_EVERY)).update(seen_at=now)
    return answers


def result(node: GpuNode, job_id: int, attempt: int, *, rank: int, run_id: str, status: str,
           result: dict | None = None, error: str = "", exit_code: int | None = None,
           stderr_tail: list[str] | None = None) -> Answer:
    """How the run ended: `succeeded` (rank 0's ends the job), `failed` (any rank's fails it),
    `cancelled` (the worker stopped it after a cancel), `interrupted` (the worker shut down: retried)."""
    tail = [line[:500] for line in (stderr_tail or [])[-STDERR_LINES_KEPT:]]
    with transaction.atomic():
        job = _lock_job(node, job_id)
        if attempt != job.attempt:
            return Answer("ignored", job.state, stop=True, reason=_stale(job, node, attempt))
        run = _run_for(job, node, attempt, rank, run_id)
        if run.finished_at is not None:
            return Answer("ignored", job.state, stop=True, reason="this run's result was already received")
        now = timezone.now()
        if not run.run_id:
            run.run_id, run.started_at = run_id, now
        run.finished_at, run.seen_at, run.status, run.exit_code = now, now, status, exit_code
        run.save()
        stale = _stale(job, node, attempt)
        if stale:
            return Answer("ignored", job.state, stop=True, reason=stale)
        where = f"{node.name}" + (f" (rank {rank})" if run.world_size > 1 else "")
        data = {"node": node.name, "rank": rank, "exit_code": exit_code, "status": status}
        if tail:
            data["stderr_tail"] = tail
        if job.state == JobState.CANCELLING:
            job = transition(job, JobState.CANCELLED, expected_attempt=attempt, data=data,
                             message=f"Cancelled: the runner on {where} was stopped.",
                             **({"result": result} if result else {}))
        elif job.state == JobState.PREEMPTING and status != "succeeded":
            # Stopped for the preemption (or it failed or was interrupted meanwhile): back to the queue
            # without using up an attempt; a run that failed on its own shows in the event's data.
            job = transition(job, JobState.QUEUED, expected_attempt=attempt, data=data,
                             message=f"Preempted: the runner on {where} was stopped; requeued as attempt "
                                     f"{attempt + 1}, to resume from its last checkpoint.")
        elif status == "succeeded" and rank != 0:
            JobEvent.objects.create(job=job, kind=JobEvent.Kind.NOTE, attempt=attempt, data=data,
                                    message=f"Rank {rank} finished on {node.name}.")
        elif status == "succeeded":
            if job.state == JobState.ALLOCATED:
                job = transition(job, JobState.RUNNING, expected_attempt=attempt, message=f"Started on {where}.")
            job = transition(job, JobState.SUCCEEDED, expected_attempt=attempt, data=data, result=result,
                             message=f"Succeeded on {where}.")
        elif status == "interrupted":
            retry_or_fail(job.pk, attempt, f"The worker on {where} shut down during attempt {attempt}")
            job.refresh_from_db()
        else:
            why = error.strip() or (f"The runner exited with status {exit_code}." if exit_code is not None
                                    else "The runner failed.")
            message = f"Failed on {where}: {why}"
            if tail:
                message += "\nLast lines of stderr:\n" + "\n".join(tail)
            job = transition(job, JobState.FAILED, expected_attempt=attempt, data=data, message=message,
                             error=message[:10_000], **({"result": result} if result else {}))
        return Answer("accepted", job.state, stop=job.state != JobState.RUNNING)


def free_attempts(job: Job, upto: int) -> int:
    """How many of attempts 1..upto the cluster ended rather than the job: no worker ever started them
    (their node never came up, the message was lost), or every run of theirs that started was stopped by
    its worker shutting down (a restart, a deploy). A crash, a silent worker or a node that went down
    while running counts against the job: the job may have caused it."""
    used = {attempt for attempt, started_at, status in
            AttemptRun.objects.filter(job=job, attempt__lte=upto).values_list("attempt", "started_at", "status")
            if started_at is not None and status != "interrupted"}
    return sum(1 for a in range(1, upto + 1) if a not in used)


def retry_or_fail(job_id: int, attempt: int, reason: str) -> Job | None:
    """The attempt was lost through no fault of the job (node gone, worker killed): run it again as a new
    attempt while the job has attempts left, else fail it saying why. A cancelling job just ends.

    Neither preemptions nor attempts the cluster ended (`free_attempts`: never started, or stopped by a
    worker shutting down) use up one of the job's `max_attempts`: a job is not failed for nodes that were
    never up or for restarts. Past `max_free_attempts` of those, they count too, so a job that no worker
    will ever start still ends."""
    try:
        with transaction.atomic():
            job = Job.objects.select_for_update().get(pk=job_id)
            if job.attempt != attempt or job.state not in LIVE:
                return None
            if job.state == JobState.CANCELLING:
                return transition(job, JobState.CANCELLED, expected_attempt=attempt,
                                  message=f"{reason}; the cancel is complete.")
            if job.state == JobState.PREEMPTING:
                return transition(job, JobState.QUEUED, expected_attempt=attempt, data={"reason": reason},
                                  message=f"{reason}; the preemption is complete. Requeued as attempt {attempt + 1}.")
            lost_to_cluster = free_attempts(job, attempt)
            limit = settings.DEEPOPT_WORKERS["max_free_attempts"]
            free_now = lost_to_cluster if lost_to_cluster <= limit else 0
            tries = max(0, job.attempt - job.preemptions - free_now)  # attempts the job ran in and lost
            if tries < job.max_attempts:
                free = [what for what, n in (("preemptions", job.preemptions),
                                             ("attempts that never started or that a worker shutdown stopped",
                                              free_now)) if n]
                which = (f"{attempt + 1} of {job.max_attempts}" if not free else
                         f"{attempt + 1} (try {tries + 1} of {job.max_attempts}; {' and '.join(free)} do not count)")
                return transition(job, JobState.QUEUED, expected_attempt=attempt, data={"reason": reason},
                                  message=f"{reason}. Requeued as attempt {which}.")
            ended = (f"{reason}. No attempts left ({job.max_attempts} tried)." if lost_to_cluster <= limit else
                     f"{reason}. No attempts left: {lost_to_cluster} attempts never started or were stopped by"
                     f" a worker shutdown (at most {limit} are free), {job.attempt} in all.")
            return transition(job, JobState.FAILED, expected_attempt=attempt, data={"reason": reason},
                              error=ended, message=ended)
    except (IllegalTransition, Job.DoesNotExist):
        return None


class TooLarge(Exception):
    """An artifact over DEEPOPT_WORKERS['artifact_max_bytes']: answered 413."""


def sha256_of(upload: UploadedFile) -> str:
    """The hex SHA-256 of an uploaded file, read in chunks; the file is left at its start."""
    digest = hashlib.sha256()
    upload.seek(0)
    for chunk in upload.chunks():
        digest.update(chunk)
    upload.seek(0)
    return digest.hexdigest()


def refuse_before_reading(request, limit: int, what: str) -> str | None:  # noqa: ANN001
    """Why an upload is refused from its declared length alone, before its body is read (the multipart
    envelope adds a few hundred bytes to the file), or None."""
    declared = request.META.get("CONTENT_LENGTH") or "0"
    if declared.isdigit() and int(declared) > limit + 64 * 1024:
        return f"The upload is {declared} bytes; the {what} limit is {limit}."
    return None


def store_artifact(node: GpuNode, job_id: int, attempt: int, *, rank: int, run_id: str, name: str,
                   upload: UploadedFile, max_bytes: int) -> tuple[Answer, JobArtifact | None]:
    """Keep a file the attempt produced. The file is written before the job row is locked, so a large
    upload never holds up a cancel or another report on the same job."""
    if upload.size > max_bytes:
        raise TooLarge(f"The artifact is {upload.size} bytes; the limit is {max_bytes}.")
    with transaction.atomic():
        job = _lock_job(node, job_id)
        stale = _stale(job, node, attempt)
        if stale:
            return Answer("ignored", job.state, stop=True, reason=stale), None
        _run_for(job, node, attempt, rank, run_id)
    sha256 = sha256_of(upload)
    existing = JobArtifact.objects.filter(job_id=job_id, attempt=attempt, name=name).first()
    if existing is not None:
        return _repeated(existing, sha256, job_id)
    upload.seek(0)
    artifact = JobArtifact(job_id=job_id, attempt=attempt, name=name, size=upload.size, sha256=sha256, node=node)
    artifact.file.save(name, upload, save=False)
    try:
        with transaction.atomic():
            job = _lock_job(node, job_id)
            stale = _stale(job, node, attempt)
            if stale:
                artifact.file.delete(save=False)
                return Answer("ignored", job.state, stop=True, reason=stale), None
            artifact.save()
    except IntegrityError:
        # The same upload arrived twice at once; the other one won.
        artifact.file.delete(save=False)
        return _repeated(JobArtifact.objects.get(job_id=job_id, attempt=attempt, name=name), sha256, job_id)
    return Answer("accepted", job.state), artifact


def _repeated(existing: JobArtifact, sha256: str, job_id: int) -> tuple[Answer, JobArtifact | None]:
    state = Job.objects.values_list("state", flat=True).get(pk=job_id)
    if existing.sha256 == sha256:
        return Answer("ignored", state, reason="this artifact was already received"), existing
    raise Conflict(f"Attempt {existing.attempt} already has a different artifact named {existing.name!r}.")
