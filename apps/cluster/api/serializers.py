from __future__ import annotations

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from apps.accounts.api.base import StrictSerializer, TeamField
from apps.cluster.models import Gpu, GpuNode, node_name_validator

extend_schema_field({"oneOf": [{"type": "integer"}, {"type": "string"}]})(TeamField)


class GpuInSerializer(StrictSerializer):
    index = serializers.IntegerField(min_value=0, max_value=255)
    model = serializers.CharField(max_length=100)
    memory_mb = serializers.IntegerField(min_value=1, max_value=10_000_000)
    uuid = serializers.CharField(max_length=100, required=False, allow_blank=True, default="")


class GpuSerializer(serializers.ModelSerializer):
    busy = serializers.SerializerMethodField()

    class Meta:
        model = Gpu
        fields = ["id", "index", "model", "memory_mb", "uuid", "busy"]

    @extend_schema_field(OpenApiTypes.BOOL)
    def get_busy(self, gpu: Gpu) -> bool:
        # Annotated by the node queryset (one query for all nodes), see NodeViewSet.
        return bool(getattr(gpu, "busy", False))


class NodeSerializer(serializers.ModelSerializer):
    team_name = serializers.CharField(source="team.name", read_only=True)
    gpus = GpuSerializer(many=True, read_only=True)

    class Meta:
        model = GpuNode
        fields = ["id", "name", "hostname", "team", "team_name", "rack", "state", "device_type", "labels",
                  "last_heartbeat_at", "gpus", "created_at"]
        read_only_fields = fields


class NodeCreateSerializer(StrictSerializer):
    name = serializers.CharField(max_length=63, validators=[node_name_validator])
    hostname = serializers.CharField(max_length=253)
    team = TeamField()
    rack = serializers.CharField(max_length=63, required=False, default="default")
    device_type = serializers.ChoiceField(choices=GpuNode.DeviceType.choices, default=GpuNode.DeviceType.GPU)
    labels = serializers.DictField(child=serializers.CharField(max_length=200), required=False, default=dict)
    gpus = GpuInSerializer(many=True, allow_empty=False, max_length=1024)

    def validate_name(self, value: str) -> str:
        if GpuNode.objects.filter(name=value).exists():
            raise serializers.ValidationError("A node with this name is already registered.")
        return value

    def validate_gpus(self, value: list[dict]) -> list[dict]:
        indexes = [g["index"] for g in value]
        if len(set(indexes)) != len(indexes):
            raise serializers.ValidationError("Each GPU index may appear once.")
        return value


class NodeCreatedSerializer(NodeSerializer):
    token = serializers.CharField(read_only=True, help_text="The node's token. Shown once; keep it.")

    class Meta(NodeSerializer.Meta):
        fields = [*NodeSerializer.Meta.fields, "token"]
        read_only_fields = fields
