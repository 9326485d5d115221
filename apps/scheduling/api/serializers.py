from __future__ import annotations

from drf_spectacular.utils import PolymorphicProxySerializer, extend_schema_field
from rest_framework import serializers

from apps.accounts.api.base import StrictSerializer, TeamField, only_team
from apps.cluster.services import cluster_capacity
from apps.scheduling.models import Job, JobEvent, ModelUpload
from apps.scheduling.specs import SPEC_SERIALIZERS, CompressionSpec, TrainingSpec
from apps.scheduling.states import JobState

MAX_DEPENDENCIES = 20


class ResourcesSerializer(StrictSerializer):
    gpus = serializers.IntegerField(min_value=1, max_value=100_000, default=1)
    nodes = serializers.IntegerField(min_value=1, max_value=10_000, default=1)
    gpu_memory_gb = serializers.FloatField(min_value=0.0, max_value=10_000.0, required=False, allow_null=True,
                                           default=None, help_text="Minimum memory of each GPU.")


@extend_schema_field(PolymorphicProxySerializer(
    component_name="JobSpec", serializers=[CompressionSpec, TrainingSpec], resource_type_field_name=None))
class SpecField(serializers.JSONField):
    """Validated in JobCreateSerializer.validate, by the serializer of the job's kind."""


class JobCreateSerializer(StrictSerializer):
    name = serializers.CharField(max_length=200)
    team = TeamField(required=False, help_text="Team id or slug; optional when you belong to one team.")
    kind = serializers.ChoiceField(choices=Job.Kind.choices)
    priority = serializers.ChoiceField(choices=Job.Priority.choices, default=Job.Priority.NORMAL)
    resources = ResourcesSerializer(required=False)
    walltime_minutes = serializers.IntegerField(min_value=1, max_value=60 * 24 * 90, required=False,
                                                allow_null=True, default=None)
    spec = SpecField()
    depends_on = serializers.ListField(
        child=serializers.IntegerField(min_value=1, max_value=10**18 - 1), required=False, max_length=MAX_DEPENDENCIES,
        help_text="Ids of jobs (yours to see) that must succeed first; if one fails or is cancelled, "
                  "this job is cancelled.")

    def validate_depends_on(self, ids: list[int]) -> list[Job]:
        jobs = {j.pk: j for j in Job.objects.visible_to(self.context["request"].user)
                .filter(pk__in=set(ids)).only("id", "state", "team_id")}
        errors = [f"No job {i} that you can see." for i in dict.fromkeys(ids) if i not in jobs]
        errors += [f"Job {j.pk} ended {j.state}: this job could never start." for j in jobs.values()
                   if j.state in (JobState.FAILED, JobState.CANCELLED)]
        if errors:
            raise serializers.ValidationError(errors)
        return list(jobs.values())

    def validate(self, attrs: dict) -> dict:
        user = self.context["request"].user
        team = attrs.get("team") or only_team(user, "job")
        attrs["team"] = team
        resources = attrs.pop("resources", None) or ResourcesSerializer().to_internal_value({})
        gpus, nodes, memory = resources["gpus"], resources["nodes"], resources.get("gpu_memory_gb")

        spec_serializer = SPEC_SERIALIZERS[attrs["kind"]](data=attrs.get("spec"))
        if not isinstance(attrs.get("spec"), dict):
            raise serializers.ValidationError({"spec": ["An object with the job's model and settings."]})
        if not spec_serializer.is_valid():
            raise serializers.ValidationError({"spec": spec_serializer.errors})
        attrs["spec"] = spec_serializer.validated_data
        weights = attrs["spec"].get("weights") if attrs["kind"] == Job.Kind.COMPRESSION else None
        if weights is not None:
            upload = ModelUpload.objects.filter(pk=weights, team=team).only("arch").first()
            if upload is None:
                raise serializers.ValidationError({"spec": {"weights": [
                    f"No uploaded model {weights} in team {team.name} (GET /api/v1/models/ lists them)."]}})
            if upload.arch != attrs["spec"]["model"]:
                raise serializers.ValidationError({"spec": {"weights": [
                    f"Uploaded model {weights} holds {upload.arch} weights, not {attrs['spec']['model']}."]}})

        errors: dict[str, list[str]] = {}
        if nodes > gpus:
            errors.setdefault("resources", []).append(f"{nodes} nodes need at least {nodes} GPUs.")
        elif nodes > 1 and gpus % nodes:
            errors.setdefault("resources", []).append(
                f"A multi-node job takes the same number of GPUs on each node: {gpus} GPUs do not split "
                f"evenly over {nodes} nodes.")
        if attrs["kind"] == Job.Kind.COMPRESSION and nodes > 1:
            errors.setdefault("resources", []).append("A compression job runs on one node.")
        if gpus > team.max_gpus_per_job:
            errors.setdefault("resources", []).append(
                f"{gpus} GPUs is over team {team.name}'s limit of {team.max_gpus_per_job} GPUs per job.")
        elif gpus > team.max_gpus:
            errors.setdefault("resources", []).append(
                f"{gpus} GPUs is over team {team.name}'s quota of {team.max_gpus} GPUs at once; it could never run.")
        foreign = [j.pk for j in attrs.get("depends_on", ()) if j.team_id != team.pk]
        if foreign:
            errors["depends_on"] = [f"Job {pk} is not in team {team.name}: a job waits only for its own team's jobs."
                                    for pk in foreign]
        if not errors:
            never = cluster_capacity(cached=True).why_never_fits(gpus, nodes, memory)
            if never:
                errors["resources"] = [f"Larger than the cluster can ever hold. {never}"]
        if errors:
            raise serializers.ValidationError(errors)
        attrs.update(gpus=gpus, nodes=nodes, gpu_memory_gb=memory)
        return attrs

    def create(self, validated_data: dict) -> Job:
        from apps.scheduling.services import submit_job

        return submit_job(submitter=self.context["request"].user, **validated_data)


class JobSerializer(serializers.ModelSerializer):
    team_name = serializers.CharField(source="team.name", read_only=True)
    submitter = serializers.CharField(source="submitter.username", read_only=True)
    resources = serializers.SerializerMethodField()
    spec = SpecField(read_only=True)
    pending_reason = serializers.SerializerMethodField()

    class Meta:
        model = Job
        fields = ["id", "name", "team", "team_name", "submitter", "kind", "priority", "resources",
                  "walltime_minutes", "spec", "state", "held", "held_by", "pending_reason", "attempt", "max_attempts",
                  "preemptions", "ran_seconds", "submitted_at", "started_at", "finished_at", "result", "error"]
        read_only_fields = fields

    def get_resources(self, job: Job) -> ResourcesSerializer:
        return job.resources

    get_resources = extend_schema_field(ResourcesSerializer)(get_resources)

    def get_pending_reason(self, job: Job) -> str:
        """Why it waits: the latest pass's reason once a pass has seen it (see Job.waiting_reason)."""
        return job.waiting_reason

    def to_representation(self, job: Job) -> dict:
        # The same output as the fields above would give (tests/unit/test_job_representation.py holds
        # them equal), built directly: DRF's field-by-field path is most of the CPU of the job list and
        # of a submission's response.
        return job_row([getattr(job, f) if f in _OWN else None for f in LIST_FIELDS],
                       team_name=job.team.name, submitter=job.submitter.username, reason=job.waiting_reason)


# The job list reads these columns with values_list() and builds each row with job_row(): for a page
# of 50 jobs, model instances (a Job, its Team and its User each) were a third of the request's CPU.
LIST_FIELDS = ("id", "name", "team_id", "team__name", "submitter__username", "kind", "priority", "gpus", "nodes",
               "gpu_memory_gb", "walltime_minutes", "spec", "state", "pending_reason", "queue_entry__reason",
               "attempt", "max_attempts",
               "preemptions", "ran_seconds", "submitted_at", "started_at", "finished_at", "result", "error",
               "held", "held_by")
_OWN = frozenset(f for f in LIST_FIELDS if "__" not in f)


def job_row(values, *, team_name: str | None = None, submitter: str | None = None,  # noqa: ANN001
            reason: str | None = None) -> dict:
    """One job as JobSerializer shows it, from the LIST_FIELDS values in that order (`reason`: the waiting
    reason when the caller has it, else the queue row's, else the one the job entered the queue with)."""
    (pk, name, team_id, team_name_value, submitter_value, kind, priority, gpus, nodes, gpu_memory_gb, walltime,
     spec, state, pending_reason, entry_reason, attempt, max_attempts, preemptions, ran_seconds, submitted_at,
     started_at, finished_at, result, error, held, held_by) = values
    if reason is None:
        reason = entry_reason if state == "queued" and entry_reason else pending_reason
    when = _DATETIME.to_representation
    return {
        "id": pk,
        "name": name,
        "team": team_id,
        "team_name": team_name if team_name is not None else team_name_value,
        "submitter": submitter if submitter is not None else submitter_value,
        "kind": kind,
        "priority": priority,
        "resources": {"gpus": gpus, "nodes": nodes, "gpu_memory_gb": gpu_memory_gb},
        "walltime_minutes": walltime,
        "spec": spec,
        "state": state,
        "held": held,  # held by a user (`hold`): the scheduler starts nothing of it until it is released
        "held_by": held_by,
        "pending_reason": reason,
        "attempt": attempt,
        "max_attempts": max_attempts,
        "preemptions": preemptions,  # times the scheduler stopped it to make room (it resumes)
        "ran_seconds": ran_seconds,  # what its earlier attempts ran
        "submitted_at": when(submitted_at) if submitted_at is not None else None,
        "started_at": when(started_at) if started_at is not None else None,
        "finished_at": when(finished_at) if finished_at is not None else None,
        "result": result,
        "error": error,
    }


_DATETIME = serializers.DateTimeField()


def _queue_schema():  # noqa: ANN202
    from apps.scheduling.api.queue import JobQueueSerializer

    return JobQueueSerializer(allow_null=True)


class DependencySerializer(serializers.Serializer):
    id = serializers.IntegerField()
    name = serializers.CharField()
    state = serializers.ChoiceField(choices=JobState.choices)


class JobDetailSerializer(JobSerializer):
    """A job with its place in the queue (null unless it is queued and a pass has seen it) and the jobs
    it waits for (its team's: a job may depend only on those)."""

    queue = serializers.SerializerMethodField()
    depends_on = serializers.SerializerMethodField()

    class Meta(JobSerializer.Meta):
        fields = [*JobSerializer.Meta.fields, "queue", "depends_on"]
        read_only_fields = fields

    def get_queue(self, job: Job) -> dict | None:
        from apps.scheduling.api.queue import queue_of

        return queue_of(job)

    get_queue = extend_schema_field(_queue_schema())(get_queue)

    def get_depends_on(self, job: Job) -> list[dict]:
        return list(job.depends_on.order_by("id").values("id", "name", "state"))

    get_depends_on = extend_schema_field(DependencySerializer(many=True))(get_depends_on)

    def to_representation(self, job: Job) -> dict:
        from apps.scheduling.api.queue import queue_of

        return {**super().to_representation(job), "queue": queue_of(job), "depends_on": self.get_depends_on(job)}


class JobEventSerializer(serializers.ModelSerializer):
    actor = serializers.CharField(source="actor.username", read_only=True, default=None)

    class Meta:
        model = JobEvent
        fields = ["id", "ts", "kind", "attempt", "from_state", "to_state", "message", "data", "actor"]
        read_only_fields = fields
