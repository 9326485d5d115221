"""What a node's agent tells the web app: its inventory at start, its telemetry every few seconds."""
from __future__ import annotations

import logging
from datetime import datetime

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from apps.dashboard import fanout

from .models import Gpu, GpuNode, MetricSample
from .services import forget_cluster_capacity, set_node_state
from .signals import node_changed

log = logging.getLogger(__name__)


def heartbeat_interval() -> float:
    """How often agents are told to heartbeat: at least three heartbeats fit in the silence that marks a
    node down, whatever the two settings say."""
    config = settings.DEEPOPT_WORKERS
    return min(config["heartbeat_interval_s"], config["node_silent_s"] / 3)


def register_agent(
    node: GpuNode, *, gpus: list[dict], device_type: str, hostname: str = ""
) -> tuple[GpuNode, list[str]]:
    """Bring the node's GPU list in line with what its agent found; return the node and notes.

    A GPU the agent no longer reports is removed, unless an allocation ever named it (allocations are
    history, and the database protects their GPU); it is then kept and a note says so.
    """
    notes: list[str] = []
    with transaction.atomic():
        # Lock: two agents started with the same token, or a heartbeat reviving the node, race here.
        locked = GpuNode.objects.select_for_update().get(pk=node.pk)
        existing = {gpu.index: gpu for gpu in locked.gpus.all()}
        changed = False
        for reported in gpus:
            gpu = existing.pop(reported["index"], None)
            values = {"model": reported["model"], "memory_mb": reported["memory_mb"], "uuid": reported.get("uuid", "")}
            if gpu is None:
                Gpu.objects.create(node=locked, index=reported["index"], **values)
                changed = True
            elif any(getattr(gpu, key) != value for key, value in values.items()):
                for key, value in values.items():
                    setattr(gpu, key, value)
                gpu.save(update_fields=list(values))
                changed = True
        for index, gpu in existing.items():
            if gpu.allocations.exists():
                notes.append(f"GPU {index} was not found by the agent but has allocation history; it is kept.")
            else:
                gpu.delete()
                changed = True
        fields = ["last_heartbeat_at"]
        locked.last_heartbeat_at = timezone.now()
        if device_type and device_type != locked.device_type:
            locked.device_type = device_type
            fields.append("device_type")
            changed = True
        if hostname and not locked.hostname:
            locked.hostname = hostname
            fields.append("hostname")
        locked.save(update_fields=fields)
        if changed:
            forget_cluster_capacity()
            transaction.on_commit(lambda: node_changed.send(sender=GpuNode, node=locked))
    locked = _revive(locked)
    return locked, notes


# The columns of one sample, in the order of the fast INSERT below.
SAMPLE_COLUMNS = ("node_id", "gpu_index", "ts", "utilization", "memory_used_mb", "memory_total_mb",
                  "temperature_c", "power_w")


def record_heartbeat(node: GpuNode, *, host: dict | None, gpus: list[dict]) -> GpuNode:
    """Store one reading per GPU and one for the host, and note that the node is alive.

    Samples carry the server's clock, not the agent's: one clock for every node keeps the series of
    different nodes comparable whatever their clocks say.
    """
    now = timezone.now()
    rows = [(node.pk, g["index"], now, g.get("utilization"), g.get("memory_used_mb"), g.get("memory_total_mb"),
             g.get("temperature_c"), g.get("power_w")) for g in gpus]
    if host:
        rows.append((node.pk, None, now, host.get("cpu_percent"), host.get("memory_used_mb"),
                     host.get("memory_total_mb"), None, None))
    with transaction.atomic(), connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            # Telemetry may lose its last instant in a database crash; not waiting for the WAL flush at
            # each of a large cluster's heartbeats is what keeps ingest ahead of them.
            cursor.execute("SET LOCAL synchronous_commit TO OFF")
        if rows:
            # One multi-row INSERT, without building a model per sample: a heartbeat of 8 GPUs spent
            # most of its time in the ORM's bulk_create.
            values = ", ".join(["(" + ", ".join(["%s"] * len(SAMPLE_COLUMNS)) + ")"] * len(rows))
            cursor.execute(f"INSERT INTO {MetricSample._meta.db_table} ({', '.join(SAMPLE_COLUMNS)}) "  # noqa: S608
                           f"VALUES {values}", [value for row in rows for value in _adapt(row)])
        GpuNode.objects.filter(pk=node.pk).update(last_heartbeat_at=now)
    node.last_heartbeat_at = now
    fanout.node_telemetry(node, host=host, gpus=gpus, ts=now)  # live node pages; no query
    return _revive(node)


def _adapt(row: tuple) -> tuple:
    # The raw INSERT bypasses the field's conversion of an aware datetime (SQLite stores text).
    return tuple(connection.ops.adapt_datetimefield_value(v) if isinstance(v, datetime) else v for v in row)


def go_offline(node: GpuNode) -> GpuNode:
    """The node's agent or worker is stopping: place nothing more on it until it registers again.

    An active node goes `down` at once instead of a minute later (when the reconciler would notice its
    silence), so the attempt its worker hands back is not placed on it again. A drained node stays
    drained: that is an administrator's decision, and it takes no new work anyway.
    """
    if node.state != GpuNode.State.ACTIVE:
        return node
    log.info("Node %s is going offline.", node.name)
    return set_node_state(node, GpuNode.State.DOWN)


def _revive(node: GpuNode) -> GpuNode:
    # `down` is what the reconciler sets on a silent node (the API offers only drain and activate), so
    # a node that answers again is active again. A drained node stays drained.
    if node.state != GpuNode.State.DOWN:
        return node
    log.info("Node %s answers again; it is active.", node.name)
    return set_node_state(node, GpuNode.State.ACTIVE)
