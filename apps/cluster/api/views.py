from __future__ import annotations

from django.db.models import Exists, OuterRef, Prefetch
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, status
from rest_framework.decorators import action
from rest_framework.exceptions import PermissionDenied
from rest_framework.response import Response

from apps.accounts.api.base import TeamScopedViewSet
from apps.accounts.permissions import can_manage_team
from apps.cluster import services
from apps.cluster.api.serializers import NodeCreatedSerializer, NodeCreateSerializer, NodeSerializer
from apps.cluster.models import Gpu, GpuNode


def gpus_with_busy_flag():  # noqa: ANN201
    from apps.scheduling.models import Allocation

    live = Allocation.objects.filter(gpu=OuterRef("pk"), released_at__isnull=True)
    return Gpu.objects.annotate(busy=Exists(live)).order_by("index")


class NodeViewSet(TeamScopedViewSet, mixins.ListModelMixin, mixins.RetrieveModelMixin):
    """GPU nodes of the caller's teams. Staff and team leads register, drain and activate them."""

    model = GpuNode
    serializer_class = NodeSerializer
    select_related = ("team",)
    filterset_fields = ["state", "team", "rack", "device_type"]
    ordering_fields = ["name", "created_at", "last_heartbeat_at"]

    def get_queryset(self):  # noqa: ANN201
        return super().get_queryset().prefetch_related(Prefetch("gpus", queryset=gpus_with_busy_flag()))

    @extend_schema(request=NodeCreateSerializer, responses={201: NodeCreatedSerializer})
    def create(self, request):  # noqa: ANN001, ANN201
        serializer = NodeCreateSerializer(data=request.data, context=self.get_serializer_context())
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        if not can_manage_team(request.user, data["team"]):
            raise PermissionDenied("Only staff or a lead of the team can register its nodes.")
        node, token = services.register_node(**data)
        node = self.get_queryset().get(pk=node.pk)
        node.token = token
        return Response(NodeCreatedSerializer(node).data, status=status.HTTP_201_CREATED)

    def _set_state(self, request, target: str):  # noqa: ANN001, ANN202
        node = self.get_object()
        if not can_manage_team(request.user, node.team_id):
            raise PermissionDenied("Only staff or a lead of the node's team can change its state.")
        services.set_node_state(node, target)
        return Response(NodeSerializer(self.get_queryset().get(pk=node.pk)).data)

    @extend_schema(request=None, responses=NodeSerializer)
    @action(detail=True, methods=["post"])
    def drain(self, request, pk=None):  # noqa: ANN001, ANN201
        """Stop placing new jobs on the node; jobs already running finish."""
        return self._set_state(request, GpuNode.State.DRAINING)

    @extend_schema(request=None, responses=NodeSerializer)
    @action(detail=True, methods=["post"])
    def activate(self, request, pk=None):  # noqa: ANN001, ANN201
        """Let the scheduler place jobs on the node again."""
        return self._set_state(request, GpuNode.State.ACTIVE)
