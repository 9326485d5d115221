"""Free GPUs and where a gang of GPUs fits: best fit on one node, whole nodes in one rack for more.

Nodes sit in buckets by their number of free GPUs, so best fit for a one-node job is a walk up from
the bucket of its size, independent of the number of nodes. Each node also keeps the expected end
of every busy GPU, sorted, so the earliest time a node will have p GPUs free is one index away; that
is what reservations are made of. GPU memory requests that some GPUs of a node cannot meet take a
slower path that looks at the node's GPUs one by one.
"""
from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections.abc import Hashable, Iterable, Mapping
from heapq import heapify, heappop, heappush

INF = float("inf")


class Shape:
    """What a job needs: `nodes` nodes with `per_node` GPUs each (of at least `memory_mb`)."""

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


class _Hold:
    __slots__ = ("end", "start", "where")

    def __init__(self, where: list[tuple[int, list[Hashable]]], start: float, end: float):
        self.where, self.start, self.end = where, start, end


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
        # Free GPUs of each node as (memory, index, id), smallest memory first, so that big-memory
        # GPUs stay free for the jobs that ask for them.
        self.free: list[list[tuple[int, int, Hashable]]] = []
        self.free_count: list[int] = []
        self.by_free: list[set[int]] = [set()]
        self.hidden: set[int] = set()  # reserved nodes, out of the buckets for the rest of a pass
        self.total_free = 0  # on active nodes
        # Expected end of each busy GPU, and per node all of them sorted (INF: held by something
        # the caller did not describe, which may never end).
        self.gpu_end: dict[Hashable, float] = {}
        self.ends: list[list[float]] = []
        self.jobs: dict[Hashable, _Hold] = {}
        self._overdue: list[tuple[float, int, Hashable]] = []
        self._order = 0
        # For each GPU count p, a heap of (when node n will have p GPUs free, n, version), stale
        # entries dropped lazily: the earliest node for a one-node reservation without a scan.
        self._version: list[int] = []
        self.floor_memory = INF  # the smallest GPU memory of any node: asks up to it fit anywhere
        self._ready: dict[int, list[tuple[float, int, int]]] = {}

    # -- building -------------------------------------------------------------------------------
    def add_node(self, node_id: Hashable, name: str, rack: str, active: bool,
                 gpus: Iterable[tuple[Hashable, int, int]], free_ids: Iterable[Hashable] | None = None) -> int:
        """Add a node; gpus are (GPU id, index, memory MB); free_ids None: all of them are free."""
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
        self.floor_memory = min(self.floor_memory, self.min_memory[n])
        free_set = set(self.gpu_ids[n]) if free_ids is None else set(free_ids)
        self.free.append(sorted((memory, index, gpu_id) for gpu_id, index, memory in gpus if gpu_id in free_set))
        self.free_count.append(len(self.free[n]))
        self.ends.append([])
        for gpu_id in self.gpu_ids[n]:
            if gpu_id not in free_set:
                self.gpu_end[gpu_id] = INF
                self.ends[n].append(INF)
        while len(self.by_free) <= len(gpus):
            self.by_free.append(set())
        if active:
            self.by_free[self.free_count[n]].add(n)
            self.total_free += self.free_count[n]
        self._version.append(0)
        self._touch(n)
        return n

    def _touch(self, n: int) -> None:
        """Node n changed: record when it will have 1, 2, ... GPUs free (-inf: now)."""
        self._version[n] += 1
        if not self.active[n]:
            return
        version, free, ends = self._version[n], self.free_count[n], self.ends[n]
        for p in range(1, self.size[n] + 1):
            if free >= p:
                t = -INF
            elif p - free - 1 < len(ends) and ends[p - free - 1] < INF:
                t = ends[p - free - 1]
            else:
                break  # never, as far as anyone knows
            heap = self._ready.get(p)
            if heap is None:
                heap = self._ready[p] = []
            if len(heap) > 8 * len(self.ids) + 64:
                # Mostly stale entries: keep the live ones only.
                heap[:] = [e for e in heap if e[2] == self._version[e[1]]]
                heapify(heap)
            heappush(heap, (t, n, version))

    def hold(self, job_id: Hashable, gpus_by_node: Mapping[Hashable, Iterable[Hashable]], start: float,
             end: float, touched: set[int] | None = None) -> None:
        """Record a running job's GPUs (already not free) and when it is expected to end; with
        `touched`, the nodes are collected there for one `touch` call instead of re-indexed now."""
        where = []
        for node_id, ids in gpus_by_node.items():
            n = self.index.get(node_id)
            if n is None:
                continue
            ids = [g for g in ids if g in self.gpu_end]
            for gpu_id in ids:
                self._move_end(n, gpu_id, end)
            if touched is None:
                self._touch(n)
            else:
                touched.add(n)
            where.append((n, ids))
        self._track(job_id, _Hold(where, start, end))

    def touch(self, nodes: Iterable[int]) -> None:
        for n in nodes:
            self._touch(n)

    def _track(self, job_id: Hashable, hold: _Hold) -> None:
        self.jobs[job_id] = hold
        heappush(self._overdue, (hold.end, self._order, job_id))
        self._order += 1

    def _move_end(self, n: int, gpu_id: Hashable, end: float) -> None:
        ends = self.ends[n]
        old = self.gpu_end.get(gpu_id)
        if old is not None:
            del ends[bisect_left(ends, old)]
        insort(ends, end)
        self.gpu_end[gpu_id] = end

    def refresh(self, now: float, grace: float) -> None:
        """Re-estimate jobs that ran past their expected end: each is expected to run as long again
        as it was expected to (doubling), since run times are heavy-tailed: a job that has outlived
        its estimate is likely a long one."""
        overdue = self._overdue
        while overdue and overdue[0][0] <= now:
            end, _, job_id = heappop(overdue)
            hold = self.jobs.get(job_id)
            if hold is None or hold.end != end:
                continue
            span = max(end - hold.start, grace)
            while hold.start + span <= now:
                span *= 2
            hold.end = hold.start + span
            for n, ids in hold.where:
                for gpu_id in ids:
                    self._move_end(n, gpu_id, hold.end)
                self._touch(n)
            heappush(overdue, (hold.end, self._order, job_id))
            self._order += 1

    # -- queries --------------------------------------------------------------------------------
    def _eligible_free(self, n: int, memory_mb: int | None) -> int:
        if not memory_mb or self.min_memory[n] >= memory_mb:
            return self.free_count[n]
        return sum(1 for memory, _, _ in self.free[n] if memory >= memory_mb)

    def _pick(self, bucket: set[int], end: float | None) -> int:
        """Among equally good nodes, the one whose jobs end closest after this one would (so that
        long jobs gather on the same nodes and the others drain for whole-node jobs)."""
        if end is None or len(bucket) == 1:
            return min(bucket)
        best = None
        ends = self.ends
        for n in bucket:
            last = ends[n][-1] if ends[n] else -INF
            key = (0, last - end, n) if last >= end else (1, end - last, n)
            if best is None or key < best:
                best = key
        return best[2]

    def place(self, shape: Shape, caps: dict[int, int] | None = None, end: float | None = None
              ) -> list[tuple[int, int]] | None:
        """Where the job would go now, [(node, GPU count)], or None; allocates nothing. `caps` limits
        what reserved (hidden) nodes may give."""
        caps = caps or {}
        if self.total_free < shape.gpus:
            return None
        if shape.nodes == 1:
            n = self._best_single(shape.per_node, shape.memory_mb, caps, end)
            return None if n is None else [(n, shape.gpus)]
        return self._best_multi(shape, caps)

    def _best_single(self, g: int, memory_mb: int | None, caps: dict[int, int], end: float | None = None
                     ) -> int | None:
        """Best fit: the node left with the fewest free GPUs, lowest index on a tie."""
        best = None
        if memory_mb is None or memory_mb <= self.floor_memory:
            by_free = self.by_free
            for k in range(g, len(by_free)):
                if by_free[k]:
                    best = (k, self._pick(by_free[k], end))
                    break
            # Hidden nodes give only what `caps` allows them (nothing when not in it): look at those in it.
            hidden = self.hidden
            for n, cap in caps.items():
                if n in hidden and self.active[n] and min(self.free_count[n], cap) >= g:
                    if best is None or (self.free_count[n], n) < best:
                        best = (self.free_count[n], n)
            return None if best is None else best[1]
        for n in range(len(self.ids)):
            if not self.active[n] or self.free_count[n] < g:
                continue
            available = self._eligible_free(n, memory_mb)
            if n in self.hidden:
                available = min(available, caps.get(n, 0))
            if available >= g and (best is None or (self.free_count[n], n) < best):
                best = (self.free_count[n], n)
        return None if best is None else best[1]

    def _best_multi(self, shape: Shape, caps: dict[int, int]) -> list[tuple[int, int]] | None:
        """Nodes with the GPUs free, all in one rack when one rack can (the rack left with the fewest
        free GPUs on the chosen nodes), else from the fewest racks."""
        p, k = shape.per_node, shape.nodes
        by_rack: dict[str, list[tuple[int, int]]] = {}
        count = 0
        for n in range(len(self.ids)):
            if not self.active[n] or self.free_count[n] < p:
                continue
            available = self._eligible_free(n, shape.memory_mb)
            if n in self.hidden:
                available = min(available, caps.get(n, 0))
            if available >= p:
                by_rack.setdefault(self.rack[n], []).append((self.free_count[n], n))
                count += 1
        if count < k:
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
            chosen = []
            for _, candidates in sorted(by_rack.items(), key=lambda kv: (-len(kv[1]), kv[0])):
                chosen.extend(sorted(candidates)[: k - len(chosen)])
                if len(chosen) == k:
                    break
        nodes = sorted(n for _, n in chosen)
        return list(zip(nodes, shape.counts(), strict=True))

    def can_ever(self, shape: Shape) -> bool:
        """Whether the active nodes could hold the job if they were all free."""
        p, memory = shape.per_node, shape.memory_mb
        nodes = 0
        for n in range(len(self.ids)):
            if self.active[n]:
                eligible = self.size[n] if not memory or self.min_memory[n] >= memory else sum(
                    1 for g in self.gpu_ids[n] if self.gpu_memory[g] >= memory)
                nodes += eligible >= p
        return nodes >= shape.nodes

    # -- changes --------------------------------------------------------------------------------
    def _set_free_count(self, n: int, count: int) -> None:
        old = self.free_count[n]
        self.free_count[n] = count
        if self.active[n]:
            self.total_free += count - old
            if n not in self.hidden:
                self.by_free[old].discard(n)
                self.by_free[count].add(n)

    def set_active(self, node_id: Hashable, active: bool) -> None:
        """Let a node take new work again, or stop giving it any (standby, draining). Its running
        jobs stay where they are and give their GPUs back as usual; only new placements and
        reservations see the change. A scheduler caches which shapes can ever fit (`can_ever`), so
        its caller must forget that cache after a change of the active set."""
        n = self.index[node_id]
        if self.active[n] == active:
            return
        self.active[n] = active
        sign = 1 if active else -1
        self.total_free += sign * self.free_count[n]
        if n not in self.hidden:  # a hidden node goes back to its bucket at unhide, if active
            if active:
                self.by_free[self.free_count[n]].add(n)
            else:
                self.by_free[self.free_count[n]].discard(n)
        # The version bump makes the node's entries in the readiness heaps stale; an active node
        # gets fresh ones.
        self._touch(n)

    def allocate(self, job_id: Hashable, where: list[tuple[int, int]], start: float, end: float,
                 memory_mb: int | None = None) -> list[tuple[Hashable, list[Hashable]]]:
        held, result = [], []
        for n, count in where:
            free = self.free[n]
            if memory_mb:
                positions = [i for i, entry in enumerate(free) if entry[0] >= memory_mb][:count]
            else:
                positions = list(range(min(count, len(free))))
            if len(positions) < count:
                raise ValueError(f"node {self.ids[n]} has no {count} free GPUs for job {job_id}")
            ids = [free[i][2] for i in positions]
            if memory_mb:
                taken = set(positions)
                self.free[n] = [entry for i, entry in enumerate(free) if i not in taken]
            else:
                del free[:count]
            ends = self.ends[n]
            for gpu_id in ids:
                self.gpu_end[gpu_id] = end
                insort(ends, end)
            self._set_free_count(n, self.free_count[n] - count)
            self._touch(n)
            held.append((n, ids))
            result.append((self.ids[n], ids))
        self._track(job_id, _Hold(held, start, end))
        return result

    def release_job(self, job_id: Hashable) -> None:
        hold = self.jobs.pop(job_id, None)
        if hold is None:
            return
        for n, ids in hold.where:
            free, ends = self.free[n], self.ends[n]
            for gpu_id in ids:
                del ends[bisect_left(ends, self.gpu_end.pop(gpu_id))]
                insort(free, (self.gpu_memory[gpu_id], self.gpu_index[gpu_id], gpu_id))
            self._set_free_count(n, self.free_count[n] + len(ids))
            self._touch(n)

    # -- reservations ---------------------------------------------------------------------------
    def _busy_ends(self, n: int, memory_mb: int | None) -> tuple[int, list[float]]:
        """(free eligible GPUs, sorted expected ends of busy eligible GPUs) of node n."""
        if not memory_mb or self.min_memory[n] >= memory_mb:
            return self.free_count[n], self.ends[n]
        ends = sorted(self.gpu_end[g] for g in self.gpu_ids[n]
                      if g in self.gpu_end and self.gpu_memory[g] >= memory_mb)
        return self._eligible_free(n, memory_mb), ends

    def ready_at(self, n: int, p: int, memory_mb: int | None, now: float) -> float:
        """When node n is expected to have p eligible GPUs free."""
        free, ends = self._busy_ends(n, memory_mb)
        if free >= p:
            return now
        k = p - free - 1
        return ends[k] if k < len(ends) else INF

    def earliest(self, shape: Shape, now: float) -> tuple[float, list[tuple[int, int]]] | None:
        """The earliest time the job could start if nothing else started, and on which nodes
        (never nodes already reserved in this pass): one rack if that costs no time, else the
        earliest nodes wherever they are."""
        p, k = shape.per_node, shape.nodes
        if shape.memory_mb and shape.memory_mb > self.floor_memory:
            ready = [(self.ready_at(n, p, shape.memory_mb, now), n) for n in range(len(self.ids))
                     if self.active[n] and self.size[n] >= p and n not in self.hidden]
            ready = sorted(entry for entry in ready if entry[0] < INF)
        else:
            ready = self._earliest_ready(p, k)
        if len(ready) < k:
            return None
        any_rack = ready[:k]
        best = None
        if k > 1:
            by_rack: dict[str, list[tuple[float, int]]] = {}
            for t, n in ready:
                by_rack.setdefault(self.rack[n], []).append((t, n))
            for rack, entries in by_rack.items():
                if len(entries) >= k and (best is None or (entries[k - 1][0], rack) < best[0]):
                    best = ((entries[k - 1][0], rack), entries[:k])
        chosen = best[1] if best is not None and best[0][0] <= any_rack[-1][0] else any_rack
        nodes = sorted(n for _, n in chosen)
        return max(now, max(t for t, _ in chosen)), list(zip(nodes, shape.counts(), strict=True))

    def _earliest_ready(self, p: int, k: int) -> list[tuple[float, int]]:
        """(time, node) of every unreserved node that will have p GPUs free no later than the k-th
        earliest one, earliest first, from the per-size heaps (-inf: free now)."""
        heap, version, hidden = self._ready.get(p, []), self._version, self.hidden
        taken: list[tuple[float, int, int]] = []
        ready: list[tuple[float, int]] = []
        while heap:
            t, n, v = heap[0]
            if v != version[n]:
                heappop(heap)
                continue
            if len(ready) >= k and t > ready[k - 1][0]:
                break
            taken.append(heappop(heap))
            if n not in hidden:
                ready.append((t, n))
        for entry in taken:
            heappush(heap, entry)
        return ready

    def spare_at(self, n: int, t: float, need: int, memory_mb: int | None) -> int:
        """GPUs of node n that a job running past t may take without starving a reservation there."""
        free, ends = self._busy_ends(n, memory_mb)
        return max(0, free + bisect_right(ends, t) - need)

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
