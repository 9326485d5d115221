"""One scheduling pass: WFQ order, gang placement, EASY backfill around one reservation, quotas.

The same Scheduler object serves the three callers. The live dispatcher builds one from a Snapshot
(`schedule`), runs one pass and throws it away; the replayer keeps one for a whole trace and feeds
it submits and ends; the ETA forecast (forecast.py) builds one and plays the queue forward.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable
from heapq import heapify, heappop, heappush

from .cluster import ClusterState, Shape
from .estimator import RuntimeEstimator
from .fairshare import TeamBook
from .queue import Entry, Flow, SubQueue
from .types import Decision, PolicyConfig, QueuedJob, Reservation, RunningJob, Snapshot, TeamSpec


class _Held:
    """The reservation of one pass: the job, when it may start, and what others may still take."""

    __slots__ = ("caps", "entry", "full", "nodes", "time")

    def __init__(self, entry: Entry, time: float, nodes: list[tuple[int, int]], caps: dict[int, int], full):
        self.entry, self.time, self.nodes, self.caps, self.full = entry, time, nodes, caps, full


class Scheduler:
    def __init__(self, config: PolicyConfig | None = None, estimator: RuntimeEstimator | None = None,
                 now: float = 0.0):
        self.config = config or PolicyConfig()
        self.estimator = estimator or RuntimeEstimator(self.config)
        self.now = now
        self.cluster = ClusterState()
        self.teams: dict[Hashable, TeamBook] = {}
        self.flows: dict[tuple[Hashable, str], Flow] = {}
        self.active_subs: set[SubQueue] = set()
        self.queued: dict[Hashable, Entry] = {}
        self.running: dict[Hashable, tuple[Hashable, int, float]] = {}  # id -> (team, gpus, est. end)
        self.reservation: _Held | None = None  # of the last pass
        self._seq = 0
        self._shapes: dict[tuple, Shape] = {}
        self._ever: dict[tuple, bool] = {}
        self._ahead: dict[SubQueue, float] = {}

    # -- building -------------------------------------------------------------------------------
    @classmethod
    def from_snapshot(cls, snapshot: Snapshot, estimator: RuntimeEstimator | None = None,
                      config: PolicyConfig | None = None) -> Scheduler:
        sched = cls(config, estimator, now=snapshot.now)
        for team in snapshot.teams:
            sched.add_team(team)
        for node in snapshot.nodes:
            sched.cluster.add_node(
                node.id, node.name, node.rack, node.state == "active",
                ((g.gpu_id, g.index, g.memory_mb) for g in node.gpus), node.free_gpu_ids,
            )
        for job in snapshot.running:
            sched.add_running(job)
        # Arrival order is the submit order; a retried attempt keeps its original place.
        for job in sorted(snapshot.queued, key=lambda j: j.submit):
            sched.enqueue(job)
        return sched

    def add_team(self, team: TeamSpec) -> TeamBook:
        book = TeamBook(
            team.id, team.name, team.weight, self.config.fair_share_half_life_s, self.now,
            max_gpus=team.max_gpus, gpu_hours_per_month=team.gpu_hours_per_month,
            max_gpus_per_job=team.max_gpus_per_job, month_used_s=team.gpu_seconds_used_this_month,
            decayed=team.decayed_usage,
        )
        self.teams[team.id] = book
        return book

    def team(self, team_id: Hashable) -> TeamBook:
        book = self.teams.get(team_id)
        if book is None:  # a team nobody described: weight 1, no limits
            book = self.add_team(TeamSpec(id=team_id, name=str(team_id)))
        return book

    def shape(self, gpus: int, nodes: int, memory_mb: int | None) -> Shape:
        key = (gpus, nodes, memory_mb or None)
        shape = self._shapes.get(key)
        if shape is None:
            shape = self._shapes[key] = Shape(gpus, nodes, memory_mb)
        return shape

    def add_running(self, job: RunningJob) -> None:
        gpus = job.gpu_count
        est_end = job.estimated_end
        if est_end is None:
            est_end = job.start + self.estimator.estimate(job.team, job.kind, gpus, job.walltime_s)
        self.cluster.hold(job.id, {node: list(ids) for node, ids in job.gpus.items()}, est_end)
        self.team(job.team).start(job.id, gpus, self.now, est_end)
        self.running[job.id] = (job.team, gpus, est_end)

    def enqueue(self, job: QueuedJob) -> Entry:
        config = self.config
        book = self.team(job.team)
        est = job.estimated_runtime_s
        if est is None:
            est = self.estimator.estimate(job.team, job.kind, job.gpus, job.walltime_s)
        cost = job.gpus * est
        if job.gpu_memory_mb:
            cost *= 1.0 + config.memory_factor * min(1.0, job.gpu_memory_mb / config.memory_reference_mb)
        weight = (book.weight * config.kind_weights.get(job.kind, 1.0)
                  * config.priority_factors.get(job.priority, 1.0))
        shape = self.shape(job.gpus, job.nodes, job.gpu_memory_mb)
        entry = Entry(job, self._seq, shape, est, cost / max(weight, 1e-9))
        self._seq += 1
        flow = self.flows.get((job.team, job.kind))
        if flow is None:
            flow = self.flows[(job.team, job.kind)] = Flow(job.team, job.kind, f"{book.name}/{job.kind}")
        sub = flow.subs.get(shape.key)
        if sub is None:
            sub = flow.subs[shape.key] = SubQueue(flow, shape)
        sub.push(entry)
        self.active_subs.add(sub)
        self.queued[job.id] = entry
        return entry

    def finish(self, job_id: Hashable, now: float) -> None:
        """A running job gave its GPUs back (ended, failed, was cancelled)."""
        team, gpus, _ = self.running.pop(job_id)
        self.cluster.release_job(job_id)
        self.teams[team].end(job_id, gpus, now)

    # -- ordering -------------------------------------------------------------------------------
    def _key(self, sub: SubQueue, now: float, levels: dict) -> tuple:
        entry = sub.jobs[sub.head]
        if self.config.policy != "wfq":
            return (0, 0.0, entry.seq, sub)
        if now - entry.submit >= self.config.aging_s:
            return (0, 0.0, entry.seq, sub)  # aged: oldest first, ahead of every younger job
        ahead = self._ahead.get(sub)
        if ahead is None:
            ahead = self._ahead[sub] = sub.flow.ahead(entry)
        level = levels.get(entry.team)
        if level is None:
            level = levels[entry.team] = self.teams[entry.team].level(now)
        if self.config.order_tag == 'start':
            return (1, level + ahead - entry.inc, entry.seq, sub)
        return (1, level + ahead, entry.seq, sub)

    def can_ever(self, shape: Shape) -> bool:
        ever = self._ever.get(shape.key)
        if ever is None:
            cluster = self.cluster
            nodes = sum(
                1 for n in range(len(cluster.ids))
                if cluster.active[n] and sum(
                    1 for g in cluster.gpu_ids[n]
                    if not shape.memory_mb or cluster.gpu_memory[g] >= shape.memory_mb
                ) >= shape.per_node
            )
            ever = self._ever[shape.key] = nodes >= shape.nodes
        return ever

    # -- the pass -------------------------------------------------------------------------------
    def schedule_pass(self, now: float, explain: bool = False,
                      format_time: Callable[[float, float], str] | None = None) -> Decision:
        self.now = now
        decision = Decision()
        self.reservation = None
        cluster = self.cluster
        config = self.config
        if not self.active_subs or (cluster.total_free == 0 and not explain):
            if explain:
                from .explain import explain_pass

                explain_pass(self, decision, now, format_time)
            return decision
        policy = config.policy
        wfq = policy == "wfq"
        levels: dict[Hashable, float] = {}
        heap = [self._key(sub, now, levels) for sub in self.active_subs]
        heapify(heap)
        held: _Held | None = None
        while heap:
            if cluster.total_free == 0 and (held is not None or not explain or not wfq or not config.backfill):
                break
            item = heappop(heap)
            sub = item[3]
            entry = sub.jobs[sub.head]
            if wfq and item[0] == 1 and heap:
                # Keys only grow during a pass (a placement raises its team's level), so a stale
                # head is re-queued with its fresh key instead of being taken out of turn.
                fresh = self._key(sub, now, levels)
                if fresh[1] > item[1] and fresh[:3] > heap[0][:3]:
                    heappush(heap, fresh)
                    continue
            book = self.teams[entry.team]
            if book.quota_block(entry.gpus, entry.est, now) or not self.can_ever(entry.shape):
                continue  # the whole sub-queue waits on the same quota or never fits; explain says which
            where = None
            if cluster.total_free >= entry.gpus:
                if held is None:
                    where = cluster.place(entry.shape)
                elif now + entry.est <= held.time:
                    where = cluster.place(entry.shape, held.full)  # back before the reservation needs it
                else:
                    where = cluster.place(entry.shape, held.caps)
            if where is not None:
                if held is not None and now + entry.est > held.time:
                    for n, count in where:
                        if n in held.caps:
                            held.caps[n] -= count
                self._start(entry, where, now, decision)
                levels.pop(entry.team, None)
                if sub.head < len(sub.jobs):
                    heappush(heap, self._key(sub, now, levels))
                else:
                    self.active_subs.discard(sub)
                continue
            if policy == "fifo":
                break  # strict arrival order: nothing may pass the head
            if policy == "firstfit":
                continue
            if not config.backfill:
                break
            if held is None:
                held = self._reserve(entry, now)
        cluster.unhide()
        self.reservation = held
        if held is not None:
            decision.reservations[held.entry.id] = Reservation(
                held.time, tuple(cluster.ids[n] for n, _ in held.nodes)
            )
        if explain:
            from .explain import explain_pass

            explain_pass(self, decision, now, format_time)
        return decision

    def _reserve(self, entry: Entry, now: float) -> _Held | None:
        cluster = self.cluster
        grace = self.config.overrun_grace_s
        found = cluster.earliest(entry.shape, now, grace)
        if found is None:
            return None
        time, nodes = found
        caps = {n: cluster.spare_at(n, time, count, entry.shape.memory_mb, now, grace) for n, count in nodes}
        full = {n: cluster.size[n] for n, _ in nodes}
        cluster.hide(caps)
        return _Held(entry, time, nodes, caps, full)

    def _start(self, entry: Entry, where: list[tuple[int, int]], now: float, decision: Decision) -> None:
        est_end = now + entry.est
        decision.placements[entry.id] = self.cluster.allocate(entry.id, where, est_end, entry.shape.memory_mb)
        sub = entry.sub
        sub.pop()
        for sibling in sub.flow.subs.values():
            self._ahead.pop(sibling, None)
        del self.queued[entry.id]
        self.running[entry.id] = (entry.team, entry.gpus, est_end)
        self.teams[entry.team].start(entry.id, entry.gpus, now, est_end)


def schedule(snapshot: Snapshot, estimator: RuntimeEstimator | None = None, config: PolicyConfig | None = None,
             format_time: Callable[[float, float], str] | None = None) -> Decision:
    """One pass over a snapshot: placements, the reservation, and why every other job waits."""
    sched = Scheduler.from_snapshot(snapshot, estimator, config)
    return sched.schedule_pass(snapshot.now, explain=True, format_time=format_time)
