"""One scheduling pass: WFQ order, gang placement, backfill around reservations, quotas.

The same Scheduler serves three callers. The live dispatcher builds one from a Snapshot (`schedule`),
runs one pass and throws it away; the trace replayer keeps one for a whole trace and feeds it
submits and ends; the ETA forecast (forecast.py) builds one and plays the queue forward.

Order. Each job is stamped once, when first queued, with WFQ tags: start = max(virtual time, finish
tag of its flow's previous job), finish = start + cost / weight, where cost = GPUs x estimated run
time x memory factor and weight = team weight x kind weight x priority factor. A pass takes jobs by
finish tag plus their team's fair-share level (decayed past usage / team weight, see fairshare.py),
except that a job queued longer than `aging_s` goes before every younger job, oldest first.

Backfill. The first job in that order that cannot start gets a reservation (its earliest start from
the expected ends of running jobs, and the nodes); so does every job past the aging bound, up to
`max_reservations`. A later job may start only where it delays no reservation: it is expected to
end before the reservation's time, or it takes GPUs the reserved job will not need.
"""
from __future__ import annotations

import gc
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from heapq import heapify, heappop, heappush
from operator import attrgetter

from .cluster import ClusterState, Shape
from .estimator import RuntimeEstimator
from .fairshare import TeamBook
from .queue import Entry, Flow, SubQueue
from .types import Decision, PolicyConfig, QueuedJob, Reservation, RunningJob, Snapshot, TeamSpec


class Held:
    """A reservation made in a pass: the job, when it may start, its nodes, and what others may
    still take on each of them (for jobs that would run past its time)."""

    __slots__ = ("caps", "entry", "nodes", "time")

    def __init__(self, entry: Entry, time: float, nodes: list[tuple[int, int]], caps: dict[int, int]):
        self.entry, self.time, self.nodes, self.caps = entry, time, nodes, caps


class Scheduler:
    def __init__(self, config: PolicyConfig | None = None, estimator: RuntimeEstimator | None = None,
                 now: float = 0.0, virtual_time: float = 0.0):
        self.config = config or PolicyConfig()
        self.estimator = estimator or RuntimeEstimator(self.config)
        self.now = now
        self.vtime = virtual_time
        self.cluster = ClusterState()
        self.teams: dict[Hashable, TeamBook] = {}
        self.flows: dict[tuple[Hashable, str], Flow] = {}
        self.active_subs: set[SubQueue] = set()
        self.queued: dict[Hashable, Entry] = {}
        self.running: dict[Hashable, tuple[Hashable, int]] = {}  # id -> (team, GPUs)
        self.reservations: list[Held] = []  # made by the last pass
        self._seq = 0
        self._shapes: dict[tuple, Shape] = {}
        self._ever: dict[tuple, bool] = {}
        self._weights: dict[tuple, float] = {}

    # -- building -------------------------------------------------------------------------------
    @classmethod
    def from_snapshot(cls, snapshot: Snapshot, estimator: RuntimeEstimator | None = None,
                      config: PolicyConfig | None = None) -> Scheduler:
        vtime = snapshot.virtual_time
        if vtime is None:
            # Nothing persisted: the smallest start tag still queued is where virtual time stood.
            stamped = [j.start_tag for j in snapshot.queued if j.start_tag is not None]
            vtime = min(stamped) if stamped else max(snapshot.flow_finish.values(), default=0.0)
        sched = cls(config, estimator, now=snapshot.now, virtual_time=vtime)
        for team in snapshot.teams:
            sched.add_team(team)
        for node in snapshot.nodes:
            sched.cluster.add_node(
                node.id, node.name, node.rack, node.state == "active",
                ((g.gpu_id, g.index, g.memory_mb) for g in node.gpus), node.free_gpu_ids,
            )
        touched = set()
        for job in snapshot.running:
            sched.add_running(job, touched)
        sched.cluster.touch(touched)
        for (team, kind), finish in snapshot.flow_finish.items():
            sched.flow(team, kind).last_finish = finish
        # Arrival order is submit order (a retried attempt keeps its place); jobs stamped in an earlier
        # pass keep their tags and the new ones are stamped after them.
        by_submit = attrgetter("submit")
        stamped = sorted((j for j in snapshot.queued if j.start_tag is not None), key=by_submit)
        fresh = sorted((j for j in snapshot.queued if j.start_tag is None), key=by_submit)
        for job in stamped + fresh:
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

    def flow(self, team: Hashable, kind: str) -> Flow:
        flow = self.flows.get((team, kind))
        if flow is None:
            flow = self.flows[(team, kind)] = Flow(team, kind, f"{self.team(team).name}/{kind}")
        return flow

    def shape(self, gpus: int, nodes: int, memory_mb: int | None) -> Shape:
        key = (gpus, nodes if nodes > 1 else 1, memory_mb or None)
        shape = self._shapes.get(key)
        if shape is None:
            shape = self._shapes[key] = Shape(gpus, nodes, memory_mb)
        return shape

    def add_running(self, job: RunningJob, touched: set[int] | None = None) -> None:
        """A job already holding GPUs; `touched` collects its nodes to re-index once at the end."""
        gpus = job.gpu_count
        end = job.estimated_end
        if end is None:
            end = job.start + self.estimator.estimate(job.team, job.kind, gpus, job.walltime_s)
        self.cluster.hold(job.id, job.gpus, job.start, end, touched)
        self.team(job.team).start(job.id, gpus, self.now, end)
        self.running[job.id] = (job.team, gpus)

    def weight(self, team: Hashable, kind: str, priority: str) -> float:
        """A job's WFQ weight: team weight x kind weight x priority factor."""
        key = (team, kind, priority)
        weight = self._weights.get(key)
        if weight is None:
            config = self.config
            weight = self._weights[key] = max(1e-9, self.team(team).weight * config.kind_weights.get(kind, 1.0)
                                              * config.priority_factors.get(priority, 1.0))
        return weight

    def enqueue(self, job: QueuedJob) -> Entry:
        """Queue a job, stamping its WFQ tags unless it carries them from an earlier pass."""
        team, kind, gpus, memory = job.team, job.kind, job.gpus, job.gpu_memory_mb
        est = job.estimated_runtime_s
        if est is None:
            est = self.estimator.estimate(team, kind, gpus, job.walltime_s)
        flow = self.flows.get((team, kind)) or self.flow(team, kind)
        shape = self._shapes.get((gpus, job.nodes if job.nodes > 1 else 1, memory or None))
        if shape is None:
            shape = self.shape(gpus, job.nodes, memory)
        if job.finish_tag is not None and job.start_tag is not None:
            start_tag, inc = job.start_tag, job.finish_tag - job.start_tag
        else:
            weight = self._weights.get((team, kind, job.priority)) or self.weight(team, kind, job.priority)
            cost = gpus * est
            if memory:
                # Asking for big-memory GPUs narrows where a job can go; it pays for what it rules out.
                config = self.config
                cost *= 1.0 + config.memory_factor * min(1.0, memory / config.memory_reference_mb)
            inc = cost / weight
            start_tag = flow.last_finish if flow.last_finish > self.vtime else self.vtime
        entry = Entry(job, self._seq, shape, est, inc, start_tag)
        self._seq += 1
        if entry.finish_tag > flow.last_finish:
            flow.last_finish = entry.finish_tag
        sub = flow.subs.get(shape.key)
        if sub is None:
            sub = flow.subs[shape.key] = SubQueue(flow, shape)
        entry.sub = sub
        sub.jobs.append(entry)
        self.active_subs.add(sub)
        self.queued[job.id] = entry
        return entry

    def finish(self, job_id: Hashable, now: float) -> None:
        """A running job gave its GPUs back (it ended, failed or was cancelled)."""
        team, gpus = self.running.pop(job_id)
        self.cluster.release_job(job_id)
        self.teams[team].end(job_id, gpus, now)

    # -- ordering -------------------------------------------------------------------------------
    def order_key(self, entry: Entry, now: float, levels: dict[Hashable, float]) -> tuple:
        """(0, 0, seq) for arrival order (fifo, firstfit, and WFQ jobs past the aging bound), else
        (1, finish tag + fair-share level, seq); smaller goes first."""
        config = self.config
        if config.policy != "wfq" or now - entry.submit >= config.aging_s:
            return (0, 0.0, entry.seq)
        level = levels.get(entry.team)
        if level is None:
            level = levels[entry.team] = self.teams[entry.team].level(now)
        return (1, entry.finish_tag + config.fair_share_weight * level, entry.seq)

    def _item(self, sub: SubQueue, position: int, now: float, levels: dict) -> tuple:
        return (*self.order_key(sub.jobs[position], now, levels), sub, position)

    def can_ever(self, shape: Shape) -> bool:
        ever = self._ever.get(shape.key)
        if ever is None:
            ever = self._ever[shape.key] = self.cluster.can_ever(shape)
        return ever

    # -- the pass -------------------------------------------------------------------------------
    def schedule_pass(self, now: float, explain: bool = False,
                      format_time: Callable[[float, float], str] | None = None) -> Decision:
        """Start what can start now. Only sub-queue heads are ever looked at: a head that cannot be
        placed blocks its sub-queue (same flow, same shape) for the rest of the pass."""
        self.now = now
        self.reservations = []
        decision = Decision()
        cluster, config = self.cluster, self.config
        if self.active_subs and (cluster.total_free > 0 or explain):
            cluster.refresh(now, config.overrun_grace_s)
            self._place_in_order(now, decision, explain)
            self._advance_vtime()
        for held in self.reservations:
            decision.reservations[held.entry.id] = Reservation(
                held.time, tuple(cluster.ids[n] for n, _ in held.nodes)
            )
        decision.virtual_time = self.vtime
        if explain:
            from .explain import explain_pass

            explain_pass(self, decision, now, format_time)
        return decision

    def _place_in_order(self, now: float, decision: Decision, explain: bool) -> None:
        cluster, config = self.cluster, self.config
        policy = config.policy
        backfill = policy == "wfq" and config.backfill
        levels: dict[Hashable, float] = {}
        heap = [self._item(sub, sub.head, now, levels) for sub in self.active_subs]
        heapify(heap)
        holds = self.reservations
        on_hold: dict[int, Held] = {}  # reserved node -> its reservation
        young_shapes: set[tuple] = set()  # shapes of the (EASY) reservations of jobs not yet aged
        try:
            while heap:
                if cluster.total_free == 0 and not explain:
                    break  # nothing can start; reservations only matter to what could
                order_class, _, _, sub, position = heappop(heap)
                entry = sub.jobs[position]
                if position == sub.head:
                    book = self.teams[entry.team]
                    if book.quota_block(entry.gpus, entry.est, now) or not self.can_ever(entry.shape):
                        continue  # its sub-queue waits on the same quota or shape; explain says which
                    end = now + entry.est
                    where = None
                    if cluster.total_free >= entry.gpus:
                        # A job expected back before a reservation's time may use its nodes freely;
                        # one that runs past it only the GPUs the reserved job will not need there.
                        caps = {n: cluster.size[n] if end <= h.time else h.caps[n] for n, h in on_hold.items()}
                        where = cluster.place(entry.shape, caps, end)
                    if where is not None:
                        for n, count in where:
                            held = on_hold.get(n)
                            if held is not None and end > held.time:
                                held.caps[n] -= count
                        self._start(entry, where, now, decision)
                        if sub.head < len(sub.jobs):
                            heappush(heap, self._item(sub, sub.head, now, levels))
                        else:
                            self.active_subs.discard(sub)
                        continue
                    if policy == "fifo" or (policy == "wfq" and not config.backfill):
                        break  # strict order: nothing may pass the first job that cannot start
                if not backfill or len(holds) >= config.max_reservations:
                    continue
                aged = order_class == 0
                if not aged and (len(young_shapes) >= config.reservation_depth or entry.shape.key in young_shapes):
                    continue
                held = self._reserve(entry, now)
                if held is None:
                    continue
                holds.append(held)
                if not aged:
                    young_shapes.add(entry.shape.key)
                for n in held.caps:
                    on_hold[n] = held
                # Past the aging bound every job gets a reservation (conservative backfill), so that
                # nothing queued later can push it back; the next aged job of this shape is next.
                nxt = position + 1
                if aged and nxt < len(sub.jobs) and now - sub.jobs[nxt].submit >= config.aging_s:
                    heappush(heap, self._item(sub, nxt, now, levels))
        finally:
            cluster.unhide()

    def _advance_vtime(self) -> None:
        """Virtual time follows the smallest start tag still queued: a flow that was idle starts
        level with the backlogged ones, neither behind them nor ahead."""
        if self.active_subs:
            head = min(sub.jobs[sub.head].start_tag for sub in self.active_subs)
            if head > self.vtime:
                self.vtime = head

    def _reserve(self, entry: Entry, now: float) -> Held | None:
        cluster = self.cluster
        found = cluster.earliest(entry.shape, now)
        if found is None:
            return None
        time, nodes = found
        caps = {n: cluster.spare_at(n, time, count, entry.shape.memory_mb) for n, count in nodes}
        cluster.hide(caps)
        return Held(entry, time, nodes, caps)

    def _start(self, entry: Entry, where: list[tuple[int, int]], now: float, decision: Decision) -> None:
        end = now + entry.est
        decision.placements[entry.id] = self.cluster.allocate(entry.id, where, now, end, entry.shape.memory_mb)
        entry.sub.pop()
        del self.queued[entry.id]
        self.running[entry.id] = (entry.team, entry.gpus)
        self.teams[entry.team].start(entry.id, entry.gpus, now, end)


@contextmanager
def cycle_gc_paused() -> Iterator[None]:
    """A pass makes a few objects per queued job, none of them in a reference cycle, and they all
    live until it returns; the cycle collector would walk them again and again (half the time of a
    100,000-job pass), so it waits until the pass is over."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def schedule(snapshot: Snapshot, estimator: RuntimeEstimator | None = None, config: PolicyConfig | None = None,
             format_time: Callable[[float, float], str] | None = None) -> Decision:
    """One pass over a snapshot: placements, reservations, and where and why every other job waits."""
    with cycle_gc_paused():
        return _schedule(snapshot, estimator, config, format_time)


def _schedule(snapshot: Snapshot, estimator: RuntimeEstimator | None, config: PolicyConfig | None,
              format_time: Callable[[float, float], str] | None) -> Decision:
    sched = Scheduler.from_snapshot(snapshot, estimator, config)
    decision = sched.schedule_pass(snapshot.now, explain=True, format_time=format_time)
    decision.flow_finish = {key: flow.last_finish for key, flow in sched.flows.items()}
    decision.stamps = {e.id: (e.est, e.start_tag, e.finish_tag) for e in sched.queued.values()}
    return decision
