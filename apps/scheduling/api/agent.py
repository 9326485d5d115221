"""The agent API for job attempts (node token only): progress, status polls, result, artifacts.

Answers (apps/scheduling/reports.py has the rules):
- 200 `{"status": "accepted", "state", "stop"}`: the report changed the job (`stop`: a cancel is pending);
- 200 `{"status": "ignored", "reason", "stop": true}`: a stale attempt, an ended job or a repeated
  report: nothing changed, and the worker should stop that attempt and not send it again;
- 404: the node holds no allocation of that job (attempt): a node reports only on its own work;
- 409: another run of the same attempt rank already started (a message delivered twice);
- 413: an artifact over the size limit.
"""
from __future__ import annotations

import re

from django.conf import settings
from django.http import FileResponse
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.exceptions import NotFound
from rest_framework.response import Response

from apps.cluster.api.agent import AgentView
from apps.scheduling import reports
from apps.scheduling.models import Allocation, Job, ModelUpload
from workers.jsonsafe import json_safe

NOT_YOURS = "No job attempt of that number is allocated to this node."


class RunnerText(serializers.CharField):
    """Text a runner printed: a NUL byte is replaced, not refused (a refused result would never arrive).
    The node's worker cleans it already (workers/jsonsafe.py); this is the server's own guard."""

    def to_internal_value(self, data):  # noqa: ANN001, ANN201
        return json_safe(super().to_internal_value(data))


class RunSerializer(serializers.Serializer):
    rank = serializers.IntegerField(min_value=0, max_value=100_000, default=0)
    run = serializers.CharField(min_length=8, max_length=64, help_text="The worker's id for this run of the attempt.")


class ProgressSerializer(RunSerializer):
    seq = serializers.IntegerField(min_value=1, help_text="Report number within the run, from 1; repeats are ignored.")
    pid = serializers.IntegerField(min_value=1, required=False, allow_null=True, default=None)
    lines = serializers.ListField(child=serializers.DictField(), max_length=reports.MAX_LINES_PER_REPORT,
                                  required=False, default=list)

    def validate_lines(self, value: list) -> list:
        return json_safe(value)


class ResultSerializer(RunSerializer):
    status = serializers.ChoiceField(choices=["succeeded", "failed", "cancelled", "interrupted"])
    result = serializers.DictField(required=False, allow_null=True, default=None)
    error = RunnerText(max_length=10_000, required=False, allow_blank=True, default="")
    exit_code = serializers.IntegerField(required=False, allow_null=True, default=None)
    stderr_tail = serializers.ListField(child=RunnerText(allow_blank=True, trim_whitespace=False),
                                        max_length=200, required=False, default=list)

    def validate_result(self, value: dict | None) -> dict | None:
        return json_safe(value)


ARTIFACT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
ARTIFACT_NAME_RULE = "Letters, digits, dots, dashes and underscores only, starting with a letter or digit."


class ArtifactUploadSerializer(RunSerializer):
    name = serializers.RegexField(ARTIFACT_NAME, required=False, error_messages={"invalid": ARTIFACT_NAME_RULE})
    file = serializers.FileField()


class StatusItemSerializer(serializers.Serializer):
    job = serializers.IntegerField(min_value=1, max_value=2**63 - 1)
    attempt = serializers.IntegerField(min_value=1, max_value=100_000)
    rank = serializers.IntegerField(min_value=0, max_value=100_000, default=0)
    run = serializers.CharField(max_length=64, required=False, allow_blank=True, default="")


class StatusSerializer(serializers.Serializer):
    attempts = StatusItemSerializer(many=True, max_length=1024)


class AttemptView(AgentView):
    def dispatch(self, request, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN201
        # The URL's numbers arrive as text (re_path); reports compare them with integer columns.
        kwargs = {**kwargs, "job_id": int(kwargs["job_id"]), "attempt": int(kwargs["attempt"])}
        return super().dispatch(request, *args, **kwargs)

    def run_report(self, call):  # noqa: ANN001, ANN201
        try:
            answer = call()
        except reports.NotYours as exc:
            raise NotFound(NOT_YOURS) from exc
        except reports.Conflict as exc:
            return Response({"status": "conflict", "detail": str(exc), "stop": True}, status=status.HTTP_409_CONFLICT)
        return Response(answer.as_dict())


class AgentAttemptStatusView(AttemptView):
    """Where one attempt stands: `continue`, or `stop` with the reason."""

    @extend_schema(responses={200: dict})
    def get(self, request, job_id: int, attempt: int):  # noqa: ANN001, ANN201
        rank_text = request.query_params.get("rank", "0")
        rank = int(rank_text) if rank_text.isdigit() else 0
        answer = reports.attempt_status(self.node, [{"job": job_id, "attempt": attempt, "rank": rank,
                                                     "run": request.query_params.get("run", "")}])[0]
        if answer["reason"] == "this node holds no such attempt":
            raise NotFound(NOT_YOURS)
        return Response(answer)


class AgentAttemptsStatusView(AgentView):
    """The worker's poll of every attempt it runs (about once a second): continue or stop, each."""

    @extend_schema(request=StatusSerializer, responses={200: dict})
    def post(self, request):  # noqa: ANN001, ANN201
        data = StatusSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        return Response({"attempts": reports.attempt_status(self.node, data.validated_data["attempts"])})


class AgentProgressView(AttemptView):
    """A batch of the runner's JSON progress lines; the first report of a run starts the attempt."""

    @extend_schema(request=ProgressSerializer, responses={200: dict, 404: dict, 409: dict})
    def post(self, request, job_id: int, attempt: int):  # noqa: ANN001, ANN201
        data = ProgressSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        return self.run_report(lambda: reports.progress(self.node, job_id, attempt, rank=v["rank"], run_id=v["run"],
                                                        seq=v["seq"], lines=v["lines"], pid=v["pid"]))


class AgentResultView(AttemptView):
    """How the run ended, with the runner's final JSON as the job's result."""

    @extend_schema(request=ResultSerializer, responses={200: dict, 404: dict, 409: dict})
    def post(self, request, job_id: int, attempt: int):  # noqa: ANN001, ANN201
        data = ResultSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        return self.run_report(lambda: reports.result(
            self.node, job_id, attempt, rank=v["rank"], run_id=v["run"], status=v["status"], result=v["result"],
            error=v["error"], exit_code=v["exit_code"], stderr_tail=v["stderr_tail"]))


class AgentArtifactView(AttemptView):
    """Upload one file the attempt produced (multipart: `file`, optional `name`, `rank`, `run`)."""

    @extend_schema(request={"multipart/form-data": ArtifactUploadSerializer}, responses={200: dict, 413: dict})
    def post(self, request, job_id: int, attempt: int):  # noqa: ANN001, ANN201
        limit = settings.DEEPOPT_WORKERS["artifact_max_bytes"]
        refused = reports.refuse_before_reading(request, limit, "artifact")
        if refused is not None:
            return Response({"detail": refused}, status=status.HTTP_413_REQUEST_ENTITY_TOO_LARGE)
        data = ArtifactUploadSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        name = v.get("name") or v["file"].name
        if not ARTIFACT_NAME.match(name):
            return Response({"name": [ARTIFACT_NAME_RULE]}, status=status.HTTP_400_BAD_REQUEST)
        try:
            answer, artifact = reports.store_artifact(self.node, job_id, attempt, rank=v["rank"], run_id=v["run"],
                                                      name=name, upload=v["file"], max_bytes=limit)
        except reports.TooLarge as exc:
            return Response({"detail": str(exc)}, status=status.HTTP_413_REQUEST_ENTITY_TOO_LARGE)
        except reports.NotYours as exc:
            raise NotFound(NOT_YOURS) from exc
        except reports.Conflict as exc:
            return Response({"status": "conflict", "detail": str(exc), "stop": False}, status=status.HTTP_409_CONFLICT)
        body = answer.as_dict()
        if artifact is not None:
            body["artifact"] = {"id": artifact.pk, "name": artifact.name, "size": artifact.size,
                                "sha256": artifact.sha256}
        return Response(body)


class AgentModelWeightsView(AttemptView):
    """The uploaded weights a compression attempt compresses (`spec.weights`), for the node it is allocated
    to: the file's bytes. 404 for a node that holds no allocation of that attempt, or a job without
    uploaded weights."""

    @extend_schema(responses={(200, "application/octet-stream"): dict})
    def get(self, request, job_id: int, attempt: int):  # noqa: ANN001, ANN201
        job = Job.objects.filter(pk=job_id).only("spec", "team_id").first()
        if job is None or not Allocation.objects.filter(job_id=job_id, attempt=attempt, node=self.node).exists():
            raise NotFound(NOT_YOURS)
        weights = (job.spec or {}).get("weights")
        upload = ModelUpload.objects.filter(pk=weights, team_id=job.team_id).first() if weights else None
        if upload is None:
            raise NotFound("This job compresses no uploaded weights.")
        return FileResponse(upload.file.open("rb"), as_attachment=True, filename="model.safetensors")
