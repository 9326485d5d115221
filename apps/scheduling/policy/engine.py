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

Preemption (two-class least attained service, as in Tiresias). A queued job that has run less than
`preempt_threshold_gpu_s` GPU-seconds in all its attempts goes before every job that has run more
(those wait in sub-queues of their own, after everything else, aging included). When such a job
cannot start, it may stop running jobs past that mark (preemptible kind, running this attempt for at
least `preempt_min_run_s`, under the per-job limit): on one node the fewest GPUs to stop, most-served
jobs first; for whole nodes the cheapest nodes. A stopped job goes back to the queue with what it has
run and resumes from its checkpoint. Live (`instant_preemption=False`) the stopped jobs give their
GPUs back only when their workers confirm, so the job they make room for waits for the next pass and
their nodes are held out of this one; the replay and the ETA forecast stop them at once.
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
from .queue import Entry, Flow, SubQueue, served_slowdown
from .types import Decision, PolicyConfig, QueuedJob, Reservation, RunningJob, Snapshot, TeamSpec


class Held:
    """A reservation made in a pass: the job, when it may start, its nodes, and what others may
    still take on each of them (for jobs that would run past its time)."""

    __slots__ = ("caps", "entry", "nodes", "time")

    def __init__(self, entry: Entry, time: float, nodes: list[tuple[int, int]], caps: dict[int, int]):
        self.entry, self.time, self.nodes, self.caps = entry, time, nodes, caps


class Run:
    """A running job as the pass sees it."""

    __slots__ = ("gpus", "kind", "preemptions", "ran_s", "start", "stopping", "team")

    def __init__(self, team: Hashable, kind: str, gpus: int, start: float, ran_s: float, preemptions: int,
                 stopping: bool = False):
        self.team, self.kind, self.gpus, self.start = team, kind, gpus, start
        self.ran_s, self.preemptions, self.stopping = ran_s, preemptions, stopping

    def attained(self, now: float) -> float:
        """GPU-seconds run in all its attempts, this one included."""
        return (self.ran_s + max(0.0, now - self.start)) * self.gpus


class Scheduler:
    def __init__(self, config: PolicyConfig | None = None, estimator: RuntimeEstimator | None = None,
                 now: float = 0.0, virtual_time: float = 0.0, instant_preemption: bool = True):
        self.config = config or PolicyConfig()
        self.estimator = estimator or RuntimeEstimator(self.config)
        self.now = now
        self.vtime = virtual_time
        self.cluster = ClusterState()
        self.teams: dict[Hashable, TeamBook] = {}
        self.flows: dict[tuple[Hashable, str], Flow] = {}
        self.active_subs: set[SubQueue] = set()
        self.queued: dict[Hashable, Entry] = {}
        self.running: dict[Hashable, Run] = {}
        self.reservations: list[Held] = []  # made by the last pass
        # Preemption: True stops a job the moment the pass decides to (replay, forecast); False leaves
        # its GPUs held until the caller reports it ended (live). Running jobs that become preemptible
        # at a time, in a heap; those that are, by node; and jobs waiting on preempted ones (last pass).
        self.instant_preemption = instant_preemption
        self.preempt = self.config.policy == "wfq" and self.config.preemption
        self._eligible: list[tuple[float, int, Hashable, Run]] = []
        self._victims: dict[int, dict[Hashable, list[Hashable]]] = {}
        # Per pass, by node: its victims in the order to stop them, and their GPUs in all.
        self._victim_order: dict[int, tuple[list[tuple[Hashable, list[Hashable], bool]], int]] = {}
        self.preempting: dict[Hashable, tuple[Hashable, ...]] = {}
        self.preempt_nodes: set[int] = set()  # nodes held in the last pass for jobs that preempt (live)
        self._seq = 0
        self._shapes: dict[tuple, Shape] = {}
        self._ever: dict[tuple, bool] = {}
        self._weights: dict[tuple, float] = {}

    # -- building -------------------------------------------------------------------------------
    @classmethod
    def from_snapshot(cls, snapshot: Snapshot, estimator: RuntimeEstimator | None = None,
                      config: PolicyConfig | None = None, instant_preemption: bool = False) -> Scheduler:
        vtime = snapshot.virtual_time
        if vtime is None:
            # Nothing persisted: the smallest start tag still queued is where virtual time stood.
            stamped = [j.start_tag for j in snapshot.queued if j.start_tag is not None]
            vtime = min(stamped) if stamped else max(snapshot.flow_finish.values(), default=0.0)
        sched = cls(config, estimator, now=snapshot.now, virtual_time=vtime, instant_preemption=instant_preemption)
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
        if job.preempting:
            # Being stopped: its GPUs come back when its worker confirms, expected within the grace (an
            # end at `now` would count as overrun and be pushed back by ClusterState.refresh).
            end = self.now + self.config.overrun_grace_s
        elif end is None:
            est = self.estimator.estimate(job.team, job.kind, gpus, job.walltime_s)
            end = job.start + max(self.config.overrun_grace_s, est - job.ran_s) if job.ran_s else job.start + est
        self.cluster.hold(job.id, job.gpus, job.start, end, touched)
        self.team(job.team).start(job.id, gpus, self.now, end)
        run = self.running[job.id] = Run(job.team, job.kind, gpus, job.start, job.ran_s, job.preemptions,
                                         job.preempting)
        if job.preempting:
            if self.preempt:
                self._add_victim(job.id)
        else:
            self._watch(job.id, run)

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
            if job.ran_s:  # a resumed job is expected to run what is left of its estimate
                est = max(self.config.overrun_grace_s, est - job.ran_s)
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
        sub_key = shape.key
        if self.preempt and job.ran_s and job.ran_s * gpus >= self.config.preempt_threshold_gpu_s:
            entry.served = True
            sub_key = (*sub_key, "served")
        sub = flow.subs.get(sub_key)
        if sub is None:
            sub = flow.subs[sub_key] = SubQueue(flow, shape)
        entry.sub = sub
        sub.jobs.append(entry)
        self.active_subs.add(sub)
        self.queued[job.id] = entry
        return entry

    def finish(self, job_id: Hashable, now: float) -> None:
        """A running job gave its GPUs back (it ended, failed, was cancelled or preempted)."""
        run = self.running.pop(job_id)
        if self._victims:
            self._drop_victim(job_id)
        self.cluster.release_job(job_id)
        self.teams[run.team].end(job_id, run.gpus, now)

    # -- preemption -----------------------------------------------------------------------------
    def _watch(self, job_id: Hashable, run: Run) -> None:
        """Note when a running job will become preemptible, if it ever will."""
        config = self.config
        if not self.preempt or run.kind not in config.preemptible_kinds:
            return
        if config.max_preemptions_per_job is not None and run.preemptions >= config.max_preemptions_per_job:
            return
        at = run.start + max(config.preempt_min_run_s, config.preempt_threshold_gpu_s / run.gpus - run.ran_s)
        heappush(self._eligible, (at, self._seq, job_id, run))
        self._seq += 1

    def _collect(self, now: float) -> bool:
        """Move the running jobs that have become preemptible by `now` to the victims; any victims?"""
        eligible = self._eligible
        while eligible and eligible[0][0] <= now:
            _, _, job_id, run = heappop(eligible)
            if self.running.get(job_id) is run:
                self._add_victim(job_id)
        return bool(self._victims)

    def next_preemptible_at(self) -> float | None:
        """When the next running job becomes preemptible (None: none will): a replay runs a pass then,
        as the live beat would, if jobs are waiting."""
        eligible = self._eligible
        while eligible and self.running.get(eligible[0][2]) is not eligible[0][3]:
            heappop(eligible)
        return eligible[0][0] if eligible else None

    def _add_victim(self, job_id: Hashable) -> None:
        hold = self.cluster.jobs.get(job_id)
        if hold is not None:
            for n, ids in hold.where:
                self._victims.setdefault(n, {})[job_id] = ids
                self._victim_order.pop(n, None)

    def _drop_victim(self, job_id: Hashable) -> None:
        hold = self.cluster.jobs.get(job_id)
        if hold is not None:
            for n, _ in hold.where:
                self._victim_order.pop(n, None)
                jobs = self._victims.get(n)
                if jobs is not None and jobs.pop(job_id, None) is not None and not jobs:
                    del self._victims[n]

    def _room(self, entry: Entry, now: float) -> tuple[list[Hashable], list[int]] | None:
        """The running jobs to stop so that `entry` fits now, and on which nodes; None: it can't."""
        cluster, running, shape = self.cluster, self.running, entry.shape
        p, memory = shape.per_node, shape.memory_mb
        options: list[tuple[int, int, list[Hashable]]] = []  # (GPUs to stop, node, jobs to stop)
        hidden = cluster.hidden
        orders = self._victim_order
        for n, jobs in self._victims.items():
            if not cluster.active[n] or n in hidden or cluster.size[n] < p:
                continue
            have = cluster._eligible_free(n, memory)
            chosen: list[Hashable] = []
            cost = 0
            if have < p:
                cached = orders.get(n)
                if cached is None:
                    # Jobs already stopping cost nothing; then the most-served first. Kept for the pass
                    # (attained service moves with the clock, the order within a pass does not).
                    order = [(job_id, jobs[job_id], running[job_id].stopping)
                             for job_id in sorted(jobs, key=lambda j: (not running[j].stopping,
                                                                        -running[j].attained(now)))]
                    cached = orders[n] = (order, sum(len(ids) for _, ids, _ in order))
                order, total = cached
                narrow = memory and cluster.min_memory[n] < memory
                if have + total < p:
                    continue
                for job_id, ids, stopping in order:
                    got = sum(1 for g in ids if cluster.gpu_memory[g] >= memory) if narrow else len(ids)
                    if not got:
                        continue
                    chosen.append(job_id)
                    have += got
                    if not stopping:
                        cost += running[job_id].gpus
                    if have >= p:
                        break
            if have >= p:
                options.append((cost, n, chosen))
        k = shape.nodes
        if k == 1:
            if not options:
                return None
            _, n, chosen = min(options, key=lambda o: (o[0], len(o[2]), o[1]))
            return (chosen, [n]) if chosen else None
        seen = {n for _, n, _ in options}
        options.extend((0, n, []) for n in range(len(cluster.ids))
                       if n not in seen and cluster.active[n] and n not in hidden
                       and cluster._eligible_free(n, memory) >= p)
        if len(options) < k:
            return None
        options.sort(key=lambda o: (o[0], o[1]))
        best = options[:k]
        by_rack: dict[str, list] = {}
        for option in options:
            by_rack.setdefault(cluster.rack[option[1]], []).append(option)
        total = sum(o[0] for o in best)
        for candidates in by_rack.values():  # one rack when that stops no more than any racks would
            if len(candidates) >= k and sum(o[0] for o in candidates[:k]) <= total:
                best = candidates[:k]
                break
        stop = list(dict.fromkeys(job_id for _, _, chosen in best for job_id in chosen))
        if not stop:
            return None  # the nodes are free: placement, not preemption, is what failed
        return stop, sorted(n for _, n, _ in best)

    def _preempt_for(self, entry: Entry, stop: list[Hashable], nodes: list[int], now: float,
                     decision: Decision) -> None:
        """Stop `stop` to make room for `entry`: at once (their GPUs are free on return), or, live, mark
        them stopping and keep their nodes out of the rest of the pass."""
        threshold_h = self.config.preempt_threshold_gpu_s / 3600
        running = self.running
        for job_id in stop:
            run = running[job_id]
            if run.stopping:
                continue
            # Names the job it makes room for only within one team: teams see nothing of each other's jobs.
            whose = f"job {entry.id} of the same team" if entry.team == run.team else "a job of another team"
            decision.preemptions[job_id] = (
                f"Preempted for {whose}, which has run less than {threshold_h:g} GPU-hours; this job had run "
                f"{run.attained(now) / 3600:.1f} GPU-hours and goes back to the queue, to resume from its "
                f"last checkpoint."
            )
            if self.instant_preemption:
                self.finish(job_id, now)
            else:
                run.stopping = True
                hold = self.cluster.jobs.get(job_id)
                for n, _ in hold.where if hold is not None else ():
                    self._victim_order.pop(n, None)
        if not self.instant_preemption:
            self.preempting[entry.id] = tuple(stop)
            self.cluster.hide(nodes)
            self.preempt_nodes.update(nodes)

    # -- ordering -------------------------------------------------------------------------------
    def order_key(self, entry: Entry, now: float, levels: dict[Hashable, float]) -> tuple:
        """(0, 0, seq) for arrival order (fifo, firstfit, and WFQ jobs past the aging bound), else
        (1, finish tag + fair-share level, seq), and for jobs past the preemption mark (2, minus the
        slowdown each would end with if it started now, seq) (or (2, finish tag + level, seq) with
        served_order "wfq"); smaller goes first."""
        config = self.config
        if config.policy != "wfq" or (now - entry.submit >= config.aging_s and not entry.served):
            return (0, 0.0, entry.seq)
        if entry.served and config.served_order == "slowdown":
            return (2, -served_slowdown(entry, now), entry.seq)
        level = levels.get(entry.team)
        if level is None:
            level = levels[entry.team] = self.teams[entry.team].level(now)
        return (2 if entry.served else 1, entry.finish_tag + config.fair_share_weight * level, entry.seq)

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
        self.preempting = {}
        self.preempt_nodes = set()
        self._victim_order = {}
        decision = Decision()
        cluster, config = self.cluster, self.config
        if self.active_subs and (cluster.total_free > 0 or explain or (self.preempt and self._collect(now))):
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
        preempt = self.preempt and self._collect(now)
        no_room: set[tuple] = set()  # shapes preemption could not make room for in this pass

        def place(entry: Entry, end: float) -> list[tuple[int, int]] | None:
            # A job expected back before a reservation's time may use its nodes freely; one that runs
            # past it only the GPUs the reserved job will not need there.
            caps = {n: cluster.size[n] if end <= h.time else h.caps[n] for n, h in on_hold.items()}
            return cluster.place(entry.shape, caps, end)

        try:
            while heap:
                if cluster.total_free == 0 and not explain and (not preempt or heap[0][0] == 2):
                    break  # nothing can start; reservations only matter to what could
                order_class, _, _, sub, position = heappop(heap)
                entry = sub.jobs[position]
                if position == sub.head:
                    book = self.teams[entry.team]
                    if book.quota_block(entry.gpus, entry.est, now) or not self.can_ever(entry.shape):
                        continue  # its sub-queue waits on the same quota or shape; explain says which
                    end = now + entry.est
                    where = place(entry, end) if cluster.total_free >= entry.gpus else None
                    if (where is None and preempt and not entry.served and entry.shape.key not in no_room
                            and self._victims):
                        room = self._room(entry, now)
                        if room is None:
                            no_room.add(entry.shape.key)
                        else:
                            self._preempt_for(entry, *room, now, decision)
                            if not self.instant_preemption:
                                continue  # it starts in a later pass, once the stopped jobs are gone
                            where = place(entry, end)
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
        job = entry.job
        run = self.running[entry.id] = Run(entry.team, job.kind, entry.gpus, now, job.ran_s, job.preemptions)
        self.teams[entry.team].start(entry.id, entry.gpus, now, end)
        self._watch(entry.id, run)


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
    sched = Scheduler.from_snapshot(snapshot, estimator, config, instant_preemption=False)
    decision = sched.schedule_pass(snapshot.now, explain=True, format_time=format_time)
    decision.flow_finish = {key: flow.last_finish for key, flow in sched.flows.items()}
    decision.stamps = {e.id: (e.est, e.start_tag, e.finish_tag) for e in sched.queued.values()}
    return decision
