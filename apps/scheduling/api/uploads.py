"""A team's own model weights: `POST /api/v1/models/` (multipart: `file`, `arch`, `team`, optional `name`),
`GET /api/v1/models/` and `/models/{id}/`. A compression job then names one as `spec.weights`.

Only safetensors is accepted (apps/scheduling/safetensors_check.py reads the header; a pickle is refused
by name). Whether the tensors fit the architecture is checked where torch is, by the compression runner
before it does anything (a mismatch fails the job at once, saying which tensor). Scoped like every
team object: another team's upload is a 404.
"""
from __future__ import annotations

from django.conf import settings
from django.db import transaction
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, serializers, status
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.response import Response

from apps.accounts.api.base import TeamField, TeamScopedViewSet, only_team
from apps.scheduling import reports, safetensors_check
from apps.scheduling.models import ModelUpload
from apps.scheduling.specs import COMPRESSION_MODELS


class ModelUploadSerializer(serializers.ModelSerializer):
    team_name = serializers.CharField(source="team.name", read_only=True)
    uploaded_by = serializers.CharField(source="uploaded_by.username", read_only=True, default=None)

    class Meta:
        model = ModelUpload
        fields = ["id", "name", "arch", "team", "team_name", "uploaded_by", "size", "sha256", "tensors", "created_at"]
        read_only_fields = fields


class ModelUploadCreateSerializer(serializers.Serializer):
    file = serializers.FileField(help_text="A safetensors file (safetensors.torch.save_file); nothing else.")
    arch = serializers.ChoiceField(choices=COMPRESSION_MODELS, help_text="The catalog architecture of the weights.")
    team = TeamField(required=False, help_text="Team id or slug; optional when you belong to one team.")
    name = serializers.CharField(max_length=200, required=False, help_text="Default: the file's name.")

    def validate(self, attrs: dict) -> dict:
        limit = settings.DEEPOPT_WORKERS["artifact_max_bytes"]
        upload = attrs["file"]
        if upload.size > limit:
            raise serializers.ValidationError({"file": [f"The file is {upload.size} bytes; the limit is {limit}."]})
        upload.seek(0)
        try:
            attrs["tensors"] = safetensors_check.check(upload, upload.size)
        except safetensors_check.NotSafetensors as exc:
            raise serializers.ValidationError({"file": [str(exc)[:1].upper() + str(exc)[1:] + "."]}) from None
        if "team" not in attrs:
            attrs["team"] = only_team(self.context["request"].user, "model")
        return attrs


def store_upload(user, validated: dict) -> ModelUpload:  # noqa: ANN001
    """Keep a file ModelUploadCreateSerializer has checked: the row and the file, or neither."""
    upload = validated["file"]
    # The `name` field is checked by its serializer; a file's own name is whatever the client sent
    # (PostgreSQL refuses a NUL byte in text, and a control character has no place in a name).
    file_name = "".join(c for c in (upload.name or "") if c.isprintable()).strip()
    row = ModelUpload(team=validated["team"], uploaded_by=user, arch=validated["arch"],
                      name=(validated.get("name") or file_name or "model.safetensors")[:200],
                      size=upload.size, sha256=reports.sha256_of(upload), tensors=validated["tensors"])
    row.file.save("model.safetensors", upload, save=False)
    try:
        with transaction.atomic():
            row.save()
    except Exception:
        row.file.delete(save=False)
        raise
    return row


class ModelUploadViewSet(TeamScopedViewSet, mixins.ListModelMixin, mixins.RetrieveModelMixin):
    """Your teams' uploaded model weights (safetensors), for compression jobs' `spec.weights`."""

    model = ModelUpload
    serializer_class = ModelUploadSerializer
    select_related = ("team", "uploaded_by")
    parser_classes = [MultiPartParser, FormParser]
    filter_backends: list = []

    @extend_schema(request={"multipart/form-data": ModelUploadCreateSerializer},
                   responses={201: ModelUploadSerializer, 413: dict})
    def create(self, request):  # noqa: ANN001, ANN201
        """Upload weights for a catalog architecture. 400 with the reason for anything not safetensors."""
        refused = reports.refuse_before_reading(request, settings.DEEPOPT_WORKERS["artifact_max_bytes"], "model")
        if refused is not None:
            return Response({"detail": refused}, status=status.HTTP_413_REQUEST_ENTITY_TOO_LARGE)
        data = ModelUploadCreateSerializer(data=request.data, context=self.get_serializer_context())
        data.is_valid(raise_exception=True)
        row = store_upload(request.user, data.validated_data)
        return Response(ModelUploadSerializer(row).data, status=status.HTTP_201_CREATED)
