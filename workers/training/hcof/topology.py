"""Where each rank sits (node, rack, local index) and which process groups each level uses.

Ranks are laid out node by node, as torchrun numbers them: rank = node_index * procs_per_node + local_rank.
The hierarchy needs the same number of processes on every node (the intra-node reduce-scatter hands each
local rank an equal shard) and, when there are several racks, the same number of nodes in every rack.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

LEVELS = ("intra_node", "inter_node", "cross_rack")


class TopologyError(ValueError):
    """The allocation cannot be turned into a regular hierarchy (told to the user in one line)."""


@dataclass(frozen=True)
class Node:
    name: str
    rack: str
    gpus: tuple[int, ...]


@dataclass(frozen=True)
class Place:
    rank: int
    node: int
    local_rank: int
    rack: int
    node_in_rack: int


@dataclass(frozen=True)
class Topology:
    nodes: tuple[Node, ...]
    racks: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        if not self.nodes:
            raise TopologyError("the topology has no nodes")
        per_node = {len(n.gpus) for n in self.nodes}
        if len(per_node) != 1 or 0 in per_node:
            raise TopologyError(f"every node needs the same non-zero number of processes, got {sorted(per_node)}")
        racks = tuple(dict.fromkeys(n.rack for n in self.nodes))
        per_rack = {sum(1 for n in self.nodes if n.rack == r) for r in racks}
        if len(per_rack) != 1:
            raise TopologyError(f"every rack needs the same number of nodes, got {sorted(per_rack)}")
        object.__setattr__(self, "racks", racks)

    @property
    def procs_per_node(self) -> int:
        return len(self.nodes[0].gpus)

    @property
    def world_size(self) -> int:
        return len(self.nodes) * self.procs_per_node

    @property
    def nodes_per_rack(self) -> int:
        return len(self.nodes) // len(self.racks)

    def place(self, rank: int) -> Place:
        if not 0 <= rank < self.world_size:
            raise TopologyError(f"rank {rank} is outside a world of {self.world_size}")
        node, local = divmod(rank, self.procs_per_node)
        rack = self.racks.index(self.nodes[node].rack)
        node_in_rack = [i for i, n in enumerate(self.nodes) if n.rack == self.nodes[node].rack].index(node)
        return Place(rank=rank, node=node, local_rank=local, rack=rack, node_in_rack=node_in_rack)

    def level_groups(self, level: str) -> list[list[int]]:
        """All groups of a level, each a sorted list of ranks; every rank is in exactly one group per level."""
        places = [self.place(r) for r in range(self.world_size)]
        if level == "intra_node":
            key = lambda p: (p.node,)  # noqa: E731
        elif level == "inter_node":
            key = lambda p: (p.rack, p.local_rank)  # noqa: E731
        elif level == "cross_rack":
            key = lambda p: (p.node_in_rack, p.local_rank)  # noqa: E731
        else:
            raise TopologyError(f"unknown level {level!r}")
        groups: dict[tuple, list[int]] = {}
        for p in places:
            groups.setdefault(key(p), []).append(p.rank)
        return list(groups.values())

    def level_size(self, level: str) -> int:
        return len(self.level_groups(level)[0])

    def gpu_of(self, rank: int) -> int:
        place = self.place(rank)
        return self.nodes[place.node].gpus[place.local_rank]

    def describe(self) -> dict:
        return {
            "nodes": [{"name": n.name, "rack": n.rack, "gpus": list(n.gpus)} for n in self.nodes],
            "world_size": self.world_size,
            "procs_per_node": self.procs_per_node,
            "racks": len(self.racks),
        }

    @classmethod
    def emulated(cls, nodes: int, procs_per_node: int, racks: int = 1) -> Topology:
        if nodes < 1 or procs_per_node < 1 or racks < 1:
            raise TopologyError("--nodes, --procs-per-node and --racks must be at least 1")
        if nodes % racks:
            raise TopologyError(f"{nodes} nodes cannot be split evenly over {racks} racks")
        per_rack = nodes // racks
        # Emulated nodes share this host's GPUs, so node i owns the host's GPUs i*P .. i*P+P-1.
        return cls(tuple(
            Node(name=f"node{i}", rack=f"rack{i // per_rack}",
                 gpus=tuple(range(i * procs_per_node, (i + 1) * procs_per_node)))
            for i in range(nodes)
        ))

    @classmethod
    def from_spec(cls, spec: str | dict) -> Topology:
        """An allocation as the dispatcher passes it: JSON text, a path to a JSON file, or a dict.

        {"nodes": [{"name": "gpu-a", "rack": "r1", "gpus": [0, 1]}, ...]}
        """
        if isinstance(spec, str):
            text = Path(spec).read_text() if not spec.lstrip().startswith("{") else spec
            try:
                spec = json.loads(text)
            except json.JSONDecodeError as exc:
                raise TopologyError(f"the topology is not valid JSON ({exc.msg})") from exc
        try:
            nodes = tuple(
                Node(name=str(n["name"]), rack=str(n.get("rack", "rack0")), gpus=tuple(int(g) for g in n["gpus"]))
                for n in spec["nodes"]
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise TopologyError(f"the topology needs nodes with a name and a list of gpus ({exc})") from exc
        return cls(nodes)


@dataclass
class LevelGroup:
    """This rank's process group at one level, and its index inside it."""

    level: str
    group: object | None  # a torch ProcessGroup; None when the level has only this rank
    size: int
    rank: int
    backend: str


def build_level_groups(topology: Topology, rank: int, backends: dict[str, str],
                       timeout: timedelta) -> dict[str, LevelGroup]:
    """Create every level's sub-groups (all ranks must create all groups, in the same order).

    `backends` maps a level to its backend, so the inter-node exchange can run over gloo sockets
    while the intra-node reduce-scatter stays on NCCL.
    """
    import torch.distributed as dist

    mine: dict[str, LevelGroup] = {}
    for level in LEVELS:
        groups = topology.level_groups(level)
        for ranks in groups:
            if len(ranks) == 1:
                pg = None
            else:
                pg = dist.new_group(ranks=ranks, backend=backends[level], timeout=timeout)
            if rank in ranks:
                mine[level] = LevelGroup(level=level, group=pg, size=len(ranks), rank=ranks.index(rank),
                                         backend=backends[level])
    return mine
