"""Jobs, their append-only event history and their GPU allocations."""
from __future__ import annotations

import uuid

from django.conf import settings
from django.core.exceptions import ObjectDoesNotExist
from django.db import models
from django.db.models import Q

from apps.accounts.models import Team, TeamOwnedQuerySet
from apps.cluster.models import Gpu, GpuNode

from .states import JobState


class Job(models.Model):
    class Kind(models.TextChoices):
        COMPRESSION = "compression", "Compression"
        TRAINING = "training", "Training"
        # A quick job that checks a node end to end (workers/selftest.py): dispatch, progress, result, artifact.
        SELFTEST = "selftest", "Self-test"

    class Priority(models.TextChoices):
        LOW = "low", "Low"
        NORMAL = "normal", "Normal"
        HIGH = "high", "High"
        URGENT = "urgent", "Urgent"

    State = JobState

    team = models.ForeignKey(Team, on_delete=models.PROTECT, related_name="jobs")
    submitter = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="jobs")
    name = models.CharField(max_length=200)
    kind = models.CharField(max_length=12, choices=Kind.choices)
    priority = models.CharField(max_length=8, choices=Priority.choices, default=Priority.NORMAL)
    # Resources: GPUs in all, spread over `nodes` nodes; optional minimum memory per GPU.
    gpus = models.PositiveIntegerField(default=1)
    nodes = models.PositiveIntegerField(default=1)
    gpu_memory_gb = models.FloatField(null=True, blank=True)
    walltime_minutes = models.PositiveIntegerField(null=True, blank=True)
    spec = models.JSONField(default=dict)
    # Jobs that must succeed before this one may start (Slurm's afterok): until they all have, the
    # scheduler holds it back; if one of them fails or is cancelled, it is cancelled.
    depends_on = models.ManyToManyField("self", symmetrical=False, related_name="dependents", blank=True)
    # Held (Slurm's `scontrol hold`): a queued job the scheduler leaves where it is until it is released.
    # `held_by` names who held it (a username, kept if the account goes).
    held = models.BooleanField(default=False)
    held_by = models.CharField(max_length=150, blank=True)

    state = models.CharField(max_length=10, choices=JobState.choices, default=JobState.QUEUED)
    # Why it waits as it enters the queue; once a pass has seen it, its QueueEntry's reason (rewritten by
    # every pass) is the one shown: see `waiting_reason`.
    pending_reason = models.CharField(max_length=300, blank=True)
    attempt = models.PositiveIntegerField(default=1)
    max_attempts = models.PositiveIntegerField(default=3)  # preemptions do not count against it
    # Preemption: how often the scheduler stopped it to make room, and the seconds its earlier attempts
    # ran (what it has been served: past PolicyConfig.preempt_threshold_gpu_s it yields to newer jobs).
    preemptions = models.PositiveIntegerField(default=0)
    ran_seconds = models.FloatField(default=0.0)
    result = models.JSONField(null=True, blank=True)
    error = models.TextField(blank=True)

    submitted_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = TeamOwnedQuerySet.as_manager()

    class Meta:
        ordering = ["-submitted_at", "-id"]
        indexes = [
            # The jobs list: a team's jobs, newest first, optionally by state.
            models.Index(fields=["team", "-submitted_at", "-id"], name="job_team_recent"),
            models.Index(fields=["team", "state", "-submitted_at"], name="job_team_state_recent"),
            # The queue and the scheduler: jobs in a state, oldest first.
            models.Index(fields=["state", "submitted_at"], name="job_state_submitted"),
        ]

    def __str__(self) -> str:
        return f"#{self.pk} {self.name}"

    @property
    def resources(self) -> dict:
        return {"gpus": self.gpus, "nodes": self.nodes, "gpu_memory_gb": self.gpu_memory_gb}

    @property
    def waiting_reason(self) -> str:
        """Why a queued job waits: its queue row's reason when that row is loaded (select_related or
        accessed before), else the reason it entered the queue with. Loads nothing itself."""
        if self.state == JobState.QUEUED and type(self).queue_entry.is_cached(self):
            try:
                reason = self.queue_entry.reason
            except ObjectDoesNotExist:  # loaded, and there is none: no pass has seen the job yet
                reason = ""
            if reason:
                return reason
        return self.pending_reason

    @property
    def is_terminal(self) -> bool:
        from .states import TERMINAL

        return self.state in TERMINAL


class JobEventQuerySet(models.QuerySet):
    def update(self, **kwargs):  # noqa: ANN201
        raise TypeError("Job events are append-only.")

    def delete(self):  # noqa: ANN201
        raise TypeError("Job events are append-only.")


class JobEvent(models.Model):
    """One thing that happened to a job. Never updated or deleted."""

    class Kind(models.TextChoices):
        STATE = "state", "State change"
        PROGRESS = "progress", "Progress"
        NOTE = "note", "Note"

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="events")
    ts = models.DateTimeField(auto_now_add=True, db_index=True)
    kind = models.CharField(max_length=10, choices=Kind.choices, default=Kind.STATE)
    attempt = models.PositiveIntegerField(default=1)
    from_state = models.CharField(max_length=10, blank=True)
    to_state = models.CharField(max_length=10, blank=True)
    message = models.TextField(blank=True)
    data = models.JSONField(default=dict, blank=True)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    objects = JobEventQuerySet.as_manager()

    class Meta:
        ordering = ["ts", "id"]
        indexes = [models.Index(fields=["job", "ts", "id"], name="jobevent_job_ts")]

    def __str__(self) -> str:
        return f"{self.job_id} {self.kind} {self.from_state}->{self.to_state}"

    def save(self, *args, **kwargs) -> None:
        if self.pk is not None:
            raise TypeError("Job events are append-only.")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):  # noqa: ANN201
        raise TypeError("Job events are append-only.")


class Allocation(models.Model):
    """One GPU given to one attempt of a job. Live while released_at is null."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="allocations")
    attempt = models.PositiveIntegerField()
    gpu = models.ForeignKey(Gpu, on_delete=models.PROTECT, related_name="allocations")
    node = models.ForeignKey(GpuNode, on_delete=models.PROTECT, related_name="allocations")
    created_at = models.DateTimeField(auto_now_add=True)
    released_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            # The database, not the scheduler's care, guarantees that a GPU is never given twice.
            models.UniqueConstraint(
                fields=["gpu"], condition=Q(released_at__isnull=True), name="one_live_allocation_per_gpu"
            ),
        ]
        indexes = [models.Index(fields=["job", "attempt"], name="alloc_job_attempt")]

    def __str__(self) -> str:
        return f"job {self.job_id} attempt {self.attempt} on {self.gpu_id}"


class QueueEntry(models.Model):
    """Where a queued job stands after the latest scheduling pass: the queue as the scheduler sees it.

    Rewritten by each pass (only the rows that changed), read by the queue API, job detail and pages.
    """

    job = models.OneToOneField(Job, on_delete=models.CASCADE, primary_key=True, related_name="queue_entry")
    position = models.PositiveIntegerField()
    flow = models.CharField(max_length=120)
    start_tag = models.FloatField()
    finish_tag = models.FloatField()
    # The run-time estimate the job was stamped with; with the tags, handed back to the next pass, so that
    # a job is stamped once (as in a replay) rather than afresh by every pass.
    estimate_s = models.FloatField(null=True, blank=True)
    reason = models.CharField(max_length=300)
    code = models.CharField(max_length=20)
    eta = models.DateTimeField(null=True, blank=True)
    reserved_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField()

    class Meta:
        ordering = ["position"]
        indexes = [models.Index(fields=["position"], name="queueentry_position")]

    def __str__(self) -> str:
        return f"#{self.position} job {self.job_id}"


class SchedulerState(models.Model):
    """The WFQ state a pass hands to the next one (one row): the virtual time and each flow's last finish
    tag. With the queue rows' tags it makes a live pass the computation a replay makes."""

    virtual_time = models.FloatField(null=True, blank=True)
    # "team id:kind" -> the flow's last finish tag
    flow_finish = models.JSONField(default=dict)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"virtual time {self.virtual_time}"


class AttemptRun(models.Model):
    """One node's share (rank) of one job attempt, as the dispatcher sent it and its worker ran it.

    Written when the attempt is dispatched, claimed by the first report of a worker's run (`run_id`:
    a second delivery of the same message cannot start the attempt twice), touched while the worker
    reports (`seen_at`, so the reconciler notices a worker that died), closed by the result.
    """

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="runs")
    attempt = models.PositiveIntegerField()
    rank = models.PositiveIntegerField(default=0)
    world_size = models.PositiveIntegerField(default=1)
    node = models.ForeignKey(GpuNode, on_delete=models.PROTECT, related_name="runs")
    dispatched_at = models.DateTimeField(null=True, blank=True)
    dispatch_count = models.PositiveIntegerField(default=0)
    run_id = models.CharField(max_length=64, blank=True)
    pid = models.PositiveIntegerField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    seen_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    last_seq = models.PositiveIntegerField(default=0)
    status = models.CharField(max_length=12, blank=True)
    exit_code = models.IntegerField(null=True, blank=True)

    class Meta:
        ordering = ["job", "attempt", "rank"]
        constraints = [
            models.UniqueConstraint(fields=["job", "attempt", "rank"], name="one_run_per_job_attempt_rank"),
        ]
        indexes = [models.Index(fields=["finished_at", "seen_at"], name="run_open_seen")]

    def __str__(self) -> str:
        return f"job {self.job_id} attempt {self.attempt} rank {self.rank} on {self.node_id}"


def new_artifact_key() -> str:
    return uuid.uuid4().hex


def artifact_upload_to(artifact: JobArtifact, filename: str) -> str:
    # A random directory: under DEBUG, MEDIA_URL serves MEDIA_ROOT without authentication, so a path
    # made only of ids could be guessed; artifacts are meant for the job's team alone.
    return f"artifacts/job-{artifact.job_id}/attempt-{artifact.attempt}/{artifact.key}/{filename}"


class JobArtifact(models.Model):
    """A file a job attempt produced (a compressed checkpoint, a report), uploaded by its worker."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="artifacts")
    attempt = models.PositiveIntegerField()
    name = models.CharField(max_length=200)
    key = models.CharField(max_length=32, default=new_artifact_key, editable=False)
    file = models.FileField(upload_to=artifact_upload_to, max_length=500)
    size = models.BigIntegerField()
    sha256 = models.CharField(max_length=64)
    node = models.ForeignKey(GpuNode, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["job", "attempt", "name"]
        constraints = [
            models.UniqueConstraint(fields=["job", "attempt", "name"], name="one_artifact_per_attempt_and_name"),
        ]

    def __str__(self) -> str:
        return f"job {self.job_id} attempt {self.attempt}: {self.name}"


def model_upload_to(upload: ModelUpload, filename: str) -> str:
    # A random directory, as for artifacts: MEDIA_URL under DEBUG serves files without authentication.
    return f"models/team-{upload.team_id}/{upload.key}/{filename}"


class ModelUpload(models.Model):
    """A team's own weights for a catalog architecture (a safetensors file, never a pickle), which its
    compression jobs name as `spec.weights` to compress instead of the catalog's weights."""

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="model_uploads")
    uploaded_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                    related_name="+")
    name = models.CharField(max_length=200)
    arch = models.CharField(max_length=32, help_text="The catalog architecture the weights are for.")
    key = models.CharField(max_length=32, default=new_artifact_key, editable=False)
    file = models.FileField(upload_to=model_upload_to, max_length=500)
    size = models.BigIntegerField()
    sha256 = models.CharField(max_length=64)
    tensors = models.PositiveIntegerField(help_text="Tensors in the file's header.")
    created_at = models.DateTimeField(auto_now_add=True)

    objects = TeamOwnedQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.name} ({self.arch}, team {self.team_id})"
