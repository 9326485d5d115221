"""Node verbs: register, drain, activate, and the capacity the cluster could ever offer a job."""
from __future__ import annotations

import time
from dataclasses import dataclass

from django.conf import settings
from django.db import transaction
from django.db.models import Count, Min

from apps.accounts.models import Team

from .models import Gpu, GpuNode
from .signals import node_changed


class IllegalNodeTransition(Exception):
    def __init__(self, current: str, target: str):
        self.current, self.target = current, target
        super().__init__(f"A {current} node cannot become {target}.")


def _announce(node: GpuNode) -> None:
    forget_cluster_capacity()
    transaction.on_commit(lambda: node_changed.send(sender=GpuNode, node=node))


def register_node(
    *,
    team: Team,
    name: str,
    hostname: str,
    rack: str = "default",
    gpus: list[dict],
    labels: dict | None = None,
    device_type: str = GpuNode.DeviceType.GPU,
) -> tuple[GpuNode, str]:
    """Create a node with its GPUs; return it and its token, which is never shown again."""
    with transaction.atomic():
        node = GpuNode(team=team, name=name, hostname=hostname, rack=rack or "default",
                       labels=labels or {}, device_type=device_type)
        token = node.issue_token()
        node.save()
        Gpu.objects.bulk_create(
            Gpu(node=node, index=g["index"], model=g["model"], memory_mb=g["memory_mb"], uuid=g.get("uuid", ""))
            for g in gpus
        )
        _announce(node)
    return node, token


def set_node_state(node: GpuNode, target: str) -> GpuNode:
    """Drain (stop placing new work; running jobs finish) or activate a node."""
    allowed = {
        GpuNode.State.DRAINING: {GpuNode.State.ACTIVE, GpuNode.State.DRAINING},
        GpuNode.State.ACTIVE: set(GpuNode.State.values),
        GpuNode.State.STANDBY: {GpuNode.State.ACTIVE, GpuNode.State.DRAINING, GpuNode.State.STANDBY},
        GpuNode.State.DOWN: set(GpuNode.State.values),
    }
    with transaction.atomic():
        # Lock: the autoscaler and an admin may change the same node at once.
        locked = GpuNode.objects.select_for_update().get(pk=node.pk)
        if locked.state not in allowed[target]:
            raise IllegalNodeTransition(locked.state, target)
        if locked.state != target:
            locked.state = target
            locked.save(update_fields=["state"])
            _announce(locked)
    node.state = locked.state
    return locked


def active_gpus() -> int:
    """GPUs on active nodes: what the scheduler may place on (the dashboard's capacity line)."""
    return Gpu.objects.filter(node__state=GpuNode.State.ACTIVE).count()


@dataclass(frozen=True)
class Capacity:
    """What the registered cluster could hold if every node were free: per-node GPU counts."""

    nodes: list[tuple[int, int]]  # (GPUs on the node, smallest GPU memory on it in MB)

    @property
    def is_empty(self) -> bool:
        return not self.nodes

    def why_never_fits(self, gpus: int, nodes: int, gpu_memory_gb: float | None) -> str | None:
        """A sentence saying why no placement could ever hold the job, or None if one could."""
        if self.is_empty:
            return None
        need_mb = (gpu_memory_gb or 0) * 1024
        per_node = -(-gpus // nodes)
        usable = [n for n, mem in self.nodes if mem >= need_mb]
        if not usable:
            return f"No GPU in the cluster has {gpu_memory_gb:g} GB of memory."
        if nodes == 1 and per_node > max(usable):
            return f"The largest node has {max(usable)} GPUs; this job asks for {gpus} on one node."
        if nodes > 1 and sum(1 for n in usable if n >= per_node) < nodes:
            return f"The cluster has fewer than {nodes} nodes with {per_node} GPUs each."
        return None


# Every submission asks whether the cluster could ever hold the job, but the answer only changes when
# nodes come or go. Each process keeps it for DEEPOPT_CAPACITY_CACHE_SECONDS and forgets it at once
# when it registers or changes a node itself; another process may see a node added in the last few
# seconds late, and meanwhile refuse a job that only that node could hold.
_capacity_cache: tuple[float, Capacity] | None = None


def forget_cluster_capacity() -> None:
    global _capacity_cache
    _capacity_cache = None


def cluster_capacity(*, cached: bool = False) -> Capacity:
    """Per-node GPU counts and memory. `cached`: a few seconds old is good enough (job submission)."""
    global _capacity_cache
    max_age = settings.DEEPOPT_CAPACITY_CACHE_SECONDS
    if cached and max_age and _capacity_cache is not None and time.monotonic() - _capacity_cache[0] < max_age:
        return _capacity_cache[1]
    rows = Gpu.objects.values("node_id").annotate(n=Count("id"), mem=Min("memory_mb")).values_list("n", "mem")
    capacity = Capacity(nodes=list(rows))
    _capacity_cache = (time.monotonic(), capacity)
    return capacity
