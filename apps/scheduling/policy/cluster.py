"""Free GPUs and where a gang of GPUs fits: best fit on one node, whole nodes in one rack for more.

Nodes are kept in buckets by their number of free GPUs, so best fit for a one-node job is a walk up
from the bucket of its size, independent of the number of nodes. GPU memory requests that some GPUs
of a node cannot meet take a slower path that counts the eligible GPUs node by node.
"""
from __future__ import annotations

from bisect import insort
from collections.abc import Hashable, Iterable

INF = float("inf")
_FREE = -1.0  # release time of a free GPU in the per-node release lists


class Shape:
    """What a job needs from the cluster: `nodes` nodes with `per_node` GPUs each of >= `memory_mb`."""

    __slots__ = ("gpus", "key", "memory_mb", "nodes", "per_node")

    def __init__(self, gpus: int, nodes: int, memory_mb: int | None):
        self.gpus = gpus
        self.nodes = max(1, nodes)
        # An uneven split (12 GPUs on 2 nodes) needs the larger share free on each node.
        self.per_node = -(-gpus // self.nodes)
        self.memory_mb = memory_mb or None
        self.key = (gpus, self.nodes, self.memory_mb)

    def counts(self) -> list[int]:
        base, extra = divmod(self.gpus, self.nodes)
        return [base + 1] * extra + [base] * (self.nodes - extra)

    def describe(self, gib: bool = True) -> str:
        memory = f" with {self.memory_mb / 1024:g} GB" if self.memory_mb else ""
        if self.nodes == 1:
            return f"{self.gpus} GPU{'s' if self.gpus != 1 else ''}{memory} on one node"
        return f"{self.nodes} whole nodes of {self.per_node} GPUs{memory}"


class ClusterState:
    def __init__(self) -> None:
        self.ids: list[Hashable] = []
        self.index: dict[Hashable, int] = {}
        self.names: list[str] = []
        self.rack: list[str] = []
        self.active: list[bool] = []
        self.size: list[int] = []
        self.gpu_ids: list[list[Hashable]] = []
        self.gpu_memory: dict[Hashable, int] = {}
        self.gpu_index: dict[Hashable, int] = {}
        self.min_memory: list[int] = []
        # Free GPU ids of each node, smallest memory first, so big-memory GPUs stay for those who ask.
        self.free: list[list[tuple[int, int, Hashable]]] = []
        self.free_count: list[int] = []
        self.by_free: list[set[int]] = [set()]
        # Estimated release time of each held GPU, for reservations; a job's est. end per GPU id.
        self.release: dict[Hashable, float] = {}
        self._release_sorted: list[list[float] | None] = []
        self.holding: dict[Hashable, list[tuple[int, list[Hashable]]]] = {}
        self.job_end: dict[Hashable, float] = {}
        self.hidden: set[int] = set()  # nodes taken out of the buckets while a reservation holds them
        self.total_free = 0  # on active nodes
        self.active_gpus = 0

    # -- building -------------------------------------------------------------------------------
    def add_node(
        self,
        node_id: Hashable,
        name: str,
        rack: str,
        active: bool,
        gpus: Iterable[tuple[Hashable, int, int]],  # (gpu id, index, memory MB)
        free_ids: Iterable[Hashable] | None = None,
    ) -> int:
        n = len(self.ids)
        gpus = list(gpus)
        self.ids.append(node_id)
        self.index[node_id] = n
        self.names.append(name)
        self.rack.append(rack)
        self.active.append(active)
        self.size.append(len(gpus))
        self.gpu_ids.append([g for g, _, _ in gpus])
        for gpu_id, index, memory in gpus:
            self.gpu_memory[gpu_id] = memory
            self.gpu_index[gpu_id] = index
        self.min_memory.append(min((m for _, _, m in gpus), default=0))
        free_set = set(self.gpu_ids[n]) if free_ids is None else set(free_ids)
        free = sorted((memory, index, gpu_id) for gpu_id, index, memory in gpus if gpu_id in free_set)
        for gpu_id, _, _ in gpus:
            if gpu_id not in free_set:
                self.release[gpu_id] = INF  # busy with something the caller did not describe
        self.free.append(free)
        self.free_count.append(len(free))
        self._release_sorted.append(None)
        while len(self.by_free) <= len(gpus):
            self.by_free.append(set())
        if active:
            self.by_free[len(free)].add(n)
            self.total_free += len(free)
            self.active_gpus += len(gpus)
        return n

    def hold(self, job_id: Hashable, gpus_by_node: dict[Hashable, Iterable[Hashable]], est_end: float) -> None:
        """Record a running job's GPUs (already not free) and when it should give them back."""
        held = []
        for node_id, ids in gpus_by_node.items():
            n = self.index.get(node_id)
            if n is None:
                continue
            ids = list(ids)
            for gpu_id in ids:
                self.release[gpu_id] = est_end
            self._release_sorted[n] = None
            held.append((n, ids))
        self.holding[job_id] = held
        self.job_end[job_id] = est_end

    # -- queries --------------------------------------------------------------------------------
    def max_free(self) -> int:
        """The most free GPUs on one active node (a necessary bound; ignores reservation caps)."""
        by_free = self.by_free
        best = max((self.free_count[n] for n in self.hidden if self.active[n]), default=0)
        for k in range(len(by_free) - 1, best, -1):
            if by_free[k]:
                return k
        return best

    def _eligible_free(self, n: int, memory_mb: int | None) -> int:
        if not memory_mb or self.min_memory[n] >= memory_mb:
            return self.free_count[n]
        return sum(1 for memory, _, _ in self.free[n] if memory >= memory_mb)

    def _available(self, n: int, memory_mb: int | None, caps: dict[int, int]) -> int:
        free = self._eligible_free(n, memory_mb)
        cap = caps.get(n)
        return free if cap is None else min(free, cap)

    def fits_now(self, shape: Shape, caps: dict[int, int] | None = None) -> bool:
        """Cheap necessary check before a placement search (ignores racks)."""
        if self.total_free < shape.gpus:
            return False
        if shape.memory_mb is None and shape.nodes == 1 and not caps:
            by_free = self.by_free
            return any(by_free[k] for k in range(shape.per_node, len(by_free)))
        return self.place(shape, caps) is not None

    def place(self, shape: Shape, caps: dict[int, int] | None = None) -> list[tuple[int, int]] | None:
        """Where the job would go now: [(node, GPU count)], or None. Does not allocate."""
        caps = caps or {}
        if self.total_free < shape.gpus:
            return None
        if shape.nodes == 1:
            n = self._best_single(shape.per_node, shape.memory_mb, caps)
            return None if n is None else [(n, shape.gpus)]
        return self._best_multi(shape, caps)

    def _best_single(self, g: int, memory_mb: int | None, caps: dict[int, int]) -> int | None:
        by_free = self.by_free
        if memory_mb is None or all(self.min_memory[n] >= memory_mb for n in range(len(self.ids))):
            best = None
            for k in range(g, len(by_free)):
                bucket = by_free[k]
                if bucket:
                    best = (k, min(bucket))
                    break
            for n in self.hidden:  # reserved nodes, usable up to their cap
                if self.active[n] and min(self.free_count[n], caps.get(n, 0)) >= g:
                    candidate = (self.free_count[n], n)
                    if best is None or candidate < best:
                        best = candidate
            return None if best is None else best[1]
        best = None
        for n in range(len(self.ids)):
            if not self.active[n] or self.free_count[n] < g:
                continue
            if self._available(n, memory_mb, caps if n in self.hidden else {}) >= g:
                candidate = (self.free_count[n], n)
                if best is None or candidate < best:
                    best = candidate
        return None if best is None else best[1]

    def _best_multi(self, shape: Shape, caps: dict[int, int]) -> list[tuple[int, int]] | None:
        p, k = shape.per_node, shape.nodes
        by_rack: dict[str, list[tuple[int, int]]] = {}
        for n in range(len(self.ids)):
            if not self.active[n] or self.free_count[n] < p:
                continue
            if self._available(n, shape.memory_mb, caps if n in self.hidden else {}) >= p:
                by_rack.setdefault(self.rack[n], []).append((self.free_count[n], n))
        if sum(len(c) for c in by_rack.values()) < k:
            return None
        best = None
        for rack, candidates in by_rack.items():
            if len(candidates) >= k:
                chosen = sorted(candidates)[:k]
                score = (sum(f for f, _ in chosen), rack)
                if best is None or score < best[0]:
                    best = (score, chosen)
        if best is not None:
            chosen = best[1]
        else:
            # No rack can take it alone: fill from the racks with the most room first, fewest racks.
            chosen = []
            for _, candidates in sorted(by_rack.items(), key=lambda kv: (-len(kv[1]), kv[0])):
                chosen.extend(sorted(candidates)[: k - len(chosen)])
                if len(chosen) == k:
                    break
        return [(n, c) for (_, n), c in zip(sorted(chosen, key=lambda fn: fn[1]), shape.counts(), strict=True)]

    # -- changes --------------------------------------------------------------------------------
    def _rebucket(self, n: int, old: int) -> None:
        if self.active[n] and n not in self.hidden:
            self.by_free[old].discard(n)
            self.by_free[self.free_count[n]].add(n)

    def allocate(
        self, job_id: Hashable, where: list[tuple[int, int]], est_end: float, memory_mb: int | None = None
    ) -> list[tuple[Hashable, list[Hashable]]]:
        held, result = [], []
        for n, count in where:
            free = self.free[n]
            if memory_mb:
                positions = [i for i, entry in enumerate(free) if entry[0] >= memory_mb][:count]
            else:
                positions = list(range(min(count, len(free))))
            if len(positions) < count:
                raise ValueError(f"node {self.ids[n]} has no {count} free GPUs for job {job_id}")
            picked = [free[i] for i in positions]
            if memory_mb:
                taken = set(positions)
                self.free[n] = [entry for i, entry in enumerate(free) if i not in taken]
            else:
                del free[:count]
            ids = [gpu_id for _, _, gpu_id in picked]
            for gpu_id in ids:
                self.release[gpu_id] = est_end
            old = self.free_count[n]
            self.free_count[n] = old - count
            if self.active[n]:
                self.total_free -= count
            self._rebucket(n, old)
            self._release_sorted[n] = None
            held.append((n, ids))
            result.append((self.ids[n], ids))
        self.holding[job_id] = held
        self.job_end[job_id] = est_end
        return result

    def release_job(self, job_id: Hashable) -> None:
        self.job_end.pop(job_id, None)
        for n, ids in self.holding.pop(job_id, ()):
            free = self.free[n]
            for gpu_id in ids:
                self.release.pop(gpu_id, None)
                insort(free, (self.gpu_memory[gpu_id], self.gpu_index[gpu_id], gpu_id))
            old = self.free_count[n]
            self.free_count[n] = old + len(ids)
            if self.active[n]:
                self.total_free += len(ids)
            self._rebucket(n, old)
            self._release_sorted[n] = None

    # -- reservations ---------------------------------------------------------------------------
    def _releases(self, n: int) -> list[float]:
        cached = self._release_sorted[n]
        if cached is None:
            release = self.release
            cached = sorted(release.get(g, _FREE) for g in self.gpu_ids[n])
            self._release_sorted[n] = cached
        return cached

    def _ready_at(self, n: int, p: int, memory_mb: int | None, now: float, grace: float) -> float:
        """When node n should have p eligible GPUs free, from the estimated ends of its jobs."""
        if memory_mb and self.min_memory[n] < memory_mb:
            times = sorted(
                self.release.get(g, _FREE) for g in self.gpu_ids[n] if self.gpu_memory[g] >= memory_mb
            )
        else:
            times = self._releases(n)
        if len(times) < p:
            return INF
        t = times[p - 1]
        if t == _FREE:
            return now
        # An overrunning job is expected to end soon, never in the past.
        return max(t, now + grace)

    def earliest(self, shape: Shape, now: float, grace: float) -> tuple[float, list[tuple[int, int]]] | None:
        """The earliest time the job could start if nothing else started, and the nodes it would use."""
        p, k = shape.per_node, shape.nodes
        ready = []
        for n in range(len(self.ids)):
            if self.active[n] and self.size[n] >= p:
                t = self._ready_at(n, p, shape.memory_mb, now, grace)
                if t < INF:
                    ready.append((t, n))
        if len(ready) < k:
            return None
        ready.sort()
        if k == 1:
            t, n = ready[0]
            return t, [(n, shape.gpus)]
        any_time = ready[k - 1][0]
        best = None
        by_rack: dict[str, list[tuple[float, int]]] = {}
        for t, n in ready:
            by_rack.setdefault(self.rack[n], []).append((t, n))
        for rack, entries in by_rack.items():
            if len(entries) >= k and (best is None or (entries[k - 1][0], rack) < best[0]):
                best = ((entries[k - 1][0], rack), entries[:k])
        chosen = best[1] if best is not None and best[0][0] <= any_time else ready[:k]
        t = max(t for t, _ in chosen)
        nodes = sorted(n for _, n in chosen)
        return t, list(zip(nodes, shape.counts(), strict=True))

    def spare_at(self, n: int, t: float, need: int, memory_mb: int | None, now: float, grace: float) -> int:
        """GPUs of node n that a job running past t may take without starving a reservation there."""
        if memory_mb and self.min_memory[n] < memory_mb:
            times = [self.release.get(g, _FREE) for g in self.gpu_ids[n] if self.gpu_memory[g] >= memory_mb]
        else:
            times = self._releases(n)
        ready = sum(1 for r in times if r == _FREE or max(r, now + grace) <= t)
        return max(0, ready - need)

    def hide(self, nodes: Iterable[int]) -> None:
        for n in nodes:
            if n not in self.hidden:
                self.hidden.add(n)
                if self.active[n]:
                    self.by_free[self.free_count[n]].discard(n)

    def unhide(self) -> None:
        for n in self.hidden:
            if self.active[n]:
                self.by_free[self.free_count[n]].add(n)
        self.hidden = set()
