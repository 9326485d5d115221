"""A job's artifacts for its team: `GET jobs/{id}/artifacts/` (list) and `…/artifacts/{artifact_id}/` (the file).

Scoped like every job endpoint: another team's job is a 404, whether it exists or not.
"""
from __future__ import annotations

from django.http import FileResponse
from django.shortcuts import get_object_or_404
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema
from rest_framework import generics, renderers, serializers
from rest_framework.settings import api_settings
from rest_framework.views import APIView

from apps.scheduling.models import Job, JobArtifact


class JobArtifactSerializer(serializers.ModelSerializer):
    node = serializers.CharField(source="node.name", read_only=True, default=None)
    download_url = serializers.SerializerMethodField()

    class Meta:
        model = JobArtifact
        fields = ["id", "name", "attempt", "size", "sha256", "node", "created_at", "download_url"]
        read_only_fields = fields

    def get_download_url(self, artifact: JobArtifact) -> str:
        path = f"/api/v1/jobs/{artifact.job_id}/artifacts/{artifact.pk}/"
        request = self.context.get("request")
        return request.build_absolute_uri(path) if request is not None else path


def visible_job(request, job_id: int) -> Job:  # noqa: ANN001
    return get_object_or_404(Job.objects.visible_to(request.user).only("pk"), pk=job_id)


class JobArtifactListView(generics.ListAPIView):
    """The files the job's attempts produced, newest attempt first."""

    serializer_class = JobArtifactSerializer
    filter_backends: list = []

    def get_queryset(self):  # noqa: ANN201
        if getattr(self, "swagger_fake_view", False):
            return JobArtifact.objects.none()
        job = visible_job(self.request, self.kwargs["job_id"])
        return JobArtifact.objects.filter(job=job).select_related("node").order_by("-attempt", "name")


class AnyMediaRenderer(renderers.JSONRenderer):
    """Lets a client that asks for the file's type (`Accept: application/octet-stream`) in; the file
    itself bypasses renderers, and an error still goes out as JSON."""

    media_type = "*/*"
    format = "file"


class JobArtifactDownloadView(APIView):
    """The artifact's bytes, as an attachment."""

    renderer_classes = [*api_settings.DEFAULT_RENDERER_CLASSES, AnyMediaRenderer]

    @extend_schema(responses={(200, "application/octet-stream"): OpenApiTypes.BINARY})
    def get(self, request, job_id: int, artifact_id: int):  # noqa: ANN001, ANN201
        job = visible_job(request, job_id)
        artifact = get_object_or_404(JobArtifact, job=job, pk=artifact_id)
        return FileResponse(artifact.file.open("rb"), as_attachment=True, filename=artifact.name)
