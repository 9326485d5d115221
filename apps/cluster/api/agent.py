"""The agent API of a node (node token only): register its inventory, heartbeat its telemetry."""
from __future__ import annotations

from django.conf import settings
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from apps.cluster import agent
from apps.cluster.authentication import IsNode, NodeTokenAuthentication
from apps.cluster.models import GpuNode


class AgentView(APIView):
    """Base of every /api/v1/agent/ view: a node token, and nothing else, gets in."""

    authentication_classes = [NodeTokenAuthentication]
    permission_classes = [IsNode]

    @property
    def node(self) -> GpuNode:
        return self.request.auth


class AgentGpuSerializer(serializers.Serializer):
    index = serializers.IntegerField(min_value=0, max_value=255)
    model = serializers.CharField(max_length=100)
    memory_mb = serializers.IntegerField(min_value=1, max_value=10_000_000)
    uuid = serializers.CharField(max_length=100, required=False, allow_blank=True, default="")


class RegisterSerializer(serializers.Serializer):
    # Agents of a newer version may send more than this; unknown keys are ignored, not refused.
    hostname = serializers.CharField(max_length=253, required=False, allow_blank=True, default="")
    device_type = serializers.ChoiceField(choices=GpuNode.DeviceType.choices)
    gpus = AgentGpuSerializer(many=True, allow_empty=False, max_length=1024)
    agent = serializers.DictField(required=False, default=dict)

    def validate_gpus(self, value: list[dict]) -> list[dict]:
        indexes = [g["index"] for g in value]
        if len(set(indexes)) != len(indexes):
            raise serializers.ValidationError("Each GPU index may appear once.")
        return value


MAX_MB = 2**31 - 1  # the memory columns are 32-bit
# Each reading: (lowest, highest, whole number). The heartbeat is the API's most frequent request (a
# 500-node cluster sends 50 a second), so it is checked by `parse_heartbeat`, not by DRF's fields;
# the serializers below describe the same body for the schema.
GPU_READINGS = {"utilization": (0, 100, False), "memory_used_mb": (0, MAX_MB, True),
                "memory_total_mb": (0, MAX_MB, True), "temperature_c": (-100, 300, False),
                "power_w": (0, 100_000, False)}
HOST_READINGS = {"cpu_percent": (0, 100, False), "memory_used_mb": (0, MAX_MB, True),
                 "memory_total_mb": (0, MAX_MB, True)}


def _readings(item: object, allowed: dict, where: str, errors: dict) -> dict:
    if not isinstance(item, dict):
        errors[where] = ["An object of readings."]
        return {}
    clean = {}
    for key, (low, high, whole) in allowed.items():
        value = item.get(key)
        if value is None:
            clean[key] = None
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
            errors[f"{where}.{key}"] = [f"A number from {low} to {high}, or null."]
        elif whole and value != int(value):
            errors[f"{where}.{key}"] = ["A whole number."]
        else:
            clean[key] = int(value) if whole else float(value)
    return clean


def parse_heartbeat(data: object) -> tuple[dict | None, list[dict]]:
    """The heartbeat's host and GPU readings, checked; unknown keys are ignored (newer agents)."""
    if not isinstance(data, dict):
        raise serializers.ValidationError({"non_field_errors": ["A JSON object with `host` and `gpus`."]})
    errors: dict[str, list[str]] = {}
    host = _readings(data["host"], HOST_READINGS, "host", errors) if data.get("host") is not None else None
    raw_gpus = data.get("gpus") or []
    gpus = []
    if not isinstance(raw_gpus, list) or len(raw_gpus) > 1024:
        errors["gpus"] = ["A list of at most 1024 GPU readings."]
        raw_gpus = []
    seen = set()
    for n, item in enumerate(raw_gpus):
        index = item.get("index") if isinstance(item, dict) else None
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= 255 or index in seen:
            errors[f"gpus.{n}.index"] = ["Each GPU's index, 0-255, once."]
            continue
        seen.add(index)
        gpus.append({"index": index, **_readings(item, GPU_READINGS, f"gpus.{n}", errors)})
    if errors:
        raise serializers.ValidationError(errors)
    return host, gpus


class GpuSampleSerializer(serializers.Serializer):
    index = serializers.IntegerField(min_value=0, max_value=255)
    utilization = serializers.FloatField(min_value=0, max_value=100, required=False, allow_null=True)
    memory_used_mb = serializers.IntegerField(min_value=0, max_value=MAX_MB, required=False, allow_null=True)
    memory_total_mb = serializers.IntegerField(min_value=0, max_value=MAX_MB, required=False, allow_null=True)
    temperature_c = serializers.FloatField(min_value=-100, max_value=300, required=False, allow_null=True)
    power_w = serializers.FloatField(min_value=0, max_value=100_000, required=False, allow_null=True)


class HostSampleSerializer(serializers.Serializer):
    cpu_percent = serializers.FloatField(min_value=0, max_value=100, required=False, allow_null=True)
    memory_used_mb = serializers.IntegerField(min_value=0, max_value=MAX_MB, required=False, allow_null=True)
    memory_total_mb = serializers.IntegerField(min_value=0, max_value=MAX_MB, required=False, allow_null=True)


class HeartbeatSerializer(serializers.Serializer):
    """The heartbeat's body, for the schema (parse_heartbeat checks it)."""

    host = HostSampleSerializer(required=False, allow_null=True, default=None)
    gpus = GpuSampleSerializer(many=True, required=False, default=list, max_length=1024)


def node_answer(node: GpuNode) -> dict:
    return {
        "id": node.pk, "name": node.name, "state": node.state, "device_type": node.device_type,
        "queue": node.queue_name, "heartbeat_interval_s": agent.heartbeat_interval(),
    }


class AgentRegisterView(AgentView):
    """The agent's first call: the GPUs (or CPU slots) it found. The node's inventory follows it."""

    @extend_schema(request=RegisterSerializer, responses={200: dict})
    def post(self, request):  # noqa: ANN001, ANN201
        data = RegisterSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        node, notes = agent.register_agent(self.node, gpus=data.validated_data["gpus"],
                                           device_type=data.validated_data["device_type"],
                                           hostname=data.validated_data["hostname"])
        gpus = list(node.gpus.order_by("index").values("index", "model", "memory_mb", "uuid"))
        return Response({**node_answer(node), "gpus": gpus, "notes": notes,
                         "artifact_max_bytes": settings.DEEPOPT_WORKERS["artifact_max_bytes"]})


class AgentHeartbeatView(AgentView):
    """Telemetry every few seconds; also how the web app knows the node is alive."""

    @extend_schema(request=HeartbeatSerializer, responses={200: dict})
    def post(self, request):  # noqa: ANN001, ANN201
        host, gpus = parse_heartbeat(request.data)
        node = agent.record_heartbeat(self.node, host=host, gpus=gpus)
        return Response(node_answer(node))


class AgentOfflineView(AgentView):
    """The node is stopping (its agent or worker shuts down): it is `down` until it registers again."""

    @extend_schema(request=None, responses={200: dict})
    def post(self, request):  # noqa: ANN001, ANN201
        return Response(node_answer(agent.go_offline(self.node)))
