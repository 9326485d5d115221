"""The queue as the scheduler sees it, after its latest pass: order, flow, virtual finish tag, reason, ETA."""
from __future__ import annotations

from drf_spectacular.utils import extend_schema_field
from rest_framework import mixins, serializers, viewsets

from apps.accounts.permissions import team_ids_of
from apps.scheduling.models import Job, QueueEntry


class QueuedJobSerializer(serializers.ModelSerializer):
    team_name = serializers.CharField(source="team.name")

    class Meta:
        model = Job
        fields = ["id", "name", "team", "team_name", "kind", "priority", "gpus", "nodes", "submitted_at"]
        read_only_fields = fields


class QueueEntrySerializer(serializers.ModelSerializer):
    job = QueuedJobSerializer()

    class Meta:
        model = QueueEntry
        fields = ["position", "flow", "start_tag", "finish_tag", "reason", "code", "eta", "reserved_at",
                  "updated_at", "job"]
        read_only_fields = fields


class JobQueueSerializer(serializers.ModelSerializer):
    """The queue part of a job's detail."""

    class Meta:
        model = QueueEntry
        fields = ["position", "flow", "finish_tag", "reason", "code", "eta", "reserved_at", "updated_at"]
        read_only_fields = fields


def queue_of(job: Job) -> dict | None:
    entry = getattr(job, "queue_entry", None) if job.state == Job.State.QUEUED else None
    return JobQueueSerializer(entry).data if entry is not None else None


queue_of = extend_schema_field(JobQueueSerializer(allow_null=True))(queue_of)


class QueueViewSet(mixins.ListModelMixin, viewsets.GenericViewSet):
    """Queued jobs of your teams in scheduler order (staff: every team). Positions are cluster-wide."""

    serializer_class = QueueEntrySerializer
    filterset_fields = ["code"]
    ordering_fields = ["position"]

    def get_queryset(self):  # noqa: ANN201
        qs = QueueEntry.objects.select_related("job", "job__team").filter(job__state=Job.State.QUEUED)
        if getattr(self, "swagger_fake_view", False):
            return qs.none()
        user = self.request.user
        return qs if user.is_staff else qs.filter(job__team_id__in=team_ids_of(user))
