"""Bytes a DDP baseline sends per level (modelled; DDP exposes no counters), shared by the runner and bench."""
from __future__ import annotations

from torch import nn

from .hcof.topology import LEVELS, Topology


def ring_link_levels(topology: Topology) -> dict[str, int]:
    """How many links of a ring over ranks 0..W-1 (node by node) stay in a node, cross nodes, cross racks."""
    world = topology.world_size
    counts = {lv: 0 for lv in LEVELS}
    for r in range(world):
        a, b = topology.place(r), topology.place((r + 1) % world)
        if world == 1:
            break
        level = "intra_node" if a.node == b.node else "inter_node" if a.rack == b.rack else "cross_rack"
        counts[level] += 1
    return counts


def ddp_payload_bytes(model: nn.Module, hook: str) -> int:
    params = [p for p in model.parameters() if p.requires_grad]
    if hook == "bf16":
        return sum(2 * p.numel() for p in params)
    if hook.startswith("powersgd:"):
        rank = int(hook.split(":")[1])
        total = 0
        for p in params:
            if p.dim() <= 1:
                total += 4 * p.numel()
                continue
            rows, cols = p.shape[0], p.numel() // p.shape[0]
            r = min(rank, rows, cols)
            # The hook compresses a matrix only when that saves at least half (min_compression_rate=2).
            total += 4 * ((rows + cols) * r if rows * cols >= 2 * (rows + cols) * r else rows * cols)
        return total
    return sum(4 * p.numel() for p in params)


def ddp_bytes_by_level(model: nn.Module, topology: Topology, hook: str) -> dict[str, int]:
    world = topology.world_size
    payload = ddp_payload_bytes(model, hook)
    per_link = 2 * (world - 1) * payload // world
    return {lv: n * per_link for lv, n in ring_link_levels(topology).items()}
