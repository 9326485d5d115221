"""Properties of the policy core on random snapshots and random small traces (hypothesis)."""
from __future__ import annotations

from collections import Counter, defaultdict

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apps.scheduling.policy import (
    GpuSpec,
    NodeSpec,
    PolicyConfig,
    QueuedJob,
    RunningJob,
    Snapshot,
    TeamSpec,
    forecast_etas,
    schedule,
)
from apps.scheduling.replay import TraceJob, run_trace, simulate

NOW = 1_760_000_000.0
GB = 1024
PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
GRACE = PolicyConfig().overrun_grace_s


@st.composite
def snapshots(draw):
    teams = [
        TeamSpec(
            id=t, name=f"T{t}", weight=draw(st.sampled_from([0.5, 1.0, 3.0])),
            max_gpus=draw(st.none() | st.integers(1, 16)),
            max_gpus_per_job=draw(st.none() | st.integers(1, 16)),
            gpu_hours_per_month=draw(st.none() | st.integers(1, 40)),
            gpu_seconds_used_this_month=draw(st.sampled_from([0.0, 3600.0, 30 * 3600.0])),
            decayed_usage=draw(st.sampled_from([0.0, 1e4, 1e6])),
        )
        for t in range(draw(st.integers(1, 3)))
    ]
    nodes, running = [], []
    job_id = 1000
    for n in range(draw(st.integers(1, 5))):
        size = draw(st.sampled_from([1, 2, 4, 8]))
        memories = [draw(st.sampled_from([16, 40, 80])) for _ in range(size)]
        gpus = tuple(GpuSpec(gpu_id=n * 100 + i, index=i, memory_mb=memories[i] * GB) for i in range(size))
        busy = sorted(draw(st.sets(st.integers(0, size - 1))))
        # Busy GPUs belong to running jobs of one or two GPUs each (some past their estimate).
        while busy:
            k = draw(st.integers(1, 2))
            take, busy = busy[:k], busy[k:]
            start = NOW - draw(st.integers(0, 20000))
            running.append(RunningJob(
                id=job_id, team=draw(st.integers(0, len(teams) - 1)), kind="training",
                gpus={n: tuple(n * 100 + i for i in take)}, start=start,
                estimated_end=start + draw(st.integers(60, 40000)),
                ran_s=draw(st.sampled_from([0.0, 0.0, 30000.0])),  # some resumed after a preemption
            ))
            job_id += 1
        free = frozenset(g.gpu_id for g in gpus) - {g for job in running for ids in job.gpus.values() for g in ids}
        nodes.append(NodeSpec(
            id=n, name=f"node-{n}", rack=draw(st.sampled_from(["a", "b"])),
            state=draw(st.sampled_from(["active"] * 4 + ["draining", "standby", "down"])),
            gpus=gpus, free_gpu_ids=free,
        ))
    queued = []
    for j in range(draw(st.integers(0, 14))):
        node_count = draw(st.sampled_from([1, 1, 1, 2, 3]))
        per_node = draw(st.sampled_from([1, 2, 4, 8]))
        queued.append(QueuedJob(
            id=j, team=draw(st.integers(0, len(teams) - 1)), kind=draw(st.sampled_from(["training", "compression"])),
            gpus=node_count * per_node, nodes=node_count, submit=NOW - draw(st.integers(0, 200000)),
            priority=draw(st.sampled_from(["low", "normal", "high", "urgent"])),
            gpu_memory_mb=draw(st.none() | st.sampled_from([20 * GB, 60 * GB])),
            walltime_s=draw(st.none() | st.integers(60, 30000)),
        ))
    config = PolicyConfig(policy=draw(st.sampled_from(["wfq", "wfq", "fifo", "firstfit"])),
                          aging_s=draw(st.sampled_from([3600.0, 86400.0])))
    return Snapshot(now=NOW, nodes=nodes, running=running, queued=queued, teams=teams), config


def expected_end(job: RunningJob) -> float:
    """When the core expects a running job to end: its estimate, doubled while it has overrun it."""
    span = job.estimated_end - job.start
    if job.estimated_end > NOW:
        return job.estimated_end
    span = max(span, GRACE)
    while job.start + span <= NOW:
        span *= 2
    return job.start + span


@PROPERTY
@given(snapshots())
def test_a_pass_gives_only_free_gpus_of_active_nodes_and_each_gang_whole(case):
    snap, config = case
    decision = schedule(snap, config=config)
    nodes = {n.id: n for n in snap.nodes}
    memory = {g.gpu_id: g.memory_mb for n in snap.nodes for g in n.gpus}
    jobs = {j.id: j for j in snap.queued}
    handed = Counter()
    for job_id, where in decision.placements.items():
        job = jobs[job_id]
        assert sum(len(ids) for _, ids in where) == job.gpus
        assert len({node_id for node_id, _ in where}) == len(where) == job.nodes
        for node_id, ids in where:
            assert nodes[node_id].state == "active"
            assert set(ids) <= nodes[node_id].free_gpu_ids
            if job.gpu_memory_mb:
                assert all(memory[g] >= job.gpu_memory_mb for g in ids)
            handed.update(ids)
    assert all(count == 1 for count in handed.values())


@PROPERTY
@given(snapshots())
def test_only_jobs_past_the_mark_are_preempted_and_only_under_wfq(case):
    snap, config = case
    decision = schedule(snap, config=config)
    if config.policy != "wfq":
        assert decision.preemptions == {}
    running = {j.id: j for j in snap.running}
    for job_id in decision.preemptions:
        job = running[job_id]
        assert job.kind in config.preemptible_kinds
        assert NOW - job.start >= config.preempt_min_run_s
        assert (job.ran_s + NOW - job.start) * job.gpu_count >= config.preempt_threshold_gpu_s
    # Live, the job it makes room for does not start in the same pass, and no job starts on its GPUs.
    freed = {g for job_id in decision.preemptions for ids in running[job_id].gpus.values() for g in ids}
    assert not freed & {g for where in decision.placements.values() for _, ids in where for g in ids}
    waiting = {job_id for job_id, p in decision.pending.items() if p.code == "preempting"}
    assert not waiting & set(decision.placements)
    if decision.preemptions:
        assert waiting


@PROPERTY
@given(snapshots())
def test_a_pass_never_takes_a_team_over_its_quotas(case):
    snap, config = case
    decision = schedule(snap, config=config)
    jobs = {j.id: j for j in snap.queued}
    placed = defaultdict(list)
    for job_id in decision.placements:
        placed[jobs[job_id].team].append(jobs[job_id])
    for team in snap.teams:
        mine = placed[team.id]
        if not mine:
            continue
        held = [r for r in snap.running if r.team == team.id]
        if team.max_gpus is not None:
            assert sum(r.gpu_count for r in held) + sum(j.gpus for j in mine) <= team.max_gpus
        if team.max_gpus_per_job is not None:
            assert all(j.gpus <= team.max_gpus_per_job for j in mine)
        if team.gpu_hours_per_month is not None:
            committed = sum(r.gpu_count * max(0.0, r.estimated_end - NOW) for r in held)
            new = sum(j.gpus * estimate_of(j) for j in mine)
            assert team.gpu_seconds_used_this_month + committed + new <= team.gpu_hours_per_month * 3600 + 1e-6


def estimate_of(job: QueuedJob) -> float:
    """What the core estimates for a job in these snapshots: its walltime, else the kind's prior
    (the estimator in these tests has seen no completions)."""
    return job.walltime_s if job.walltime_s else PolicyConfig().runtime_priors_s[job.kind]


@PROPERTY
@given(snapshots())
def test_every_queued_job_is_placed_or_told_where_it_stands(case):
    snap, config = case
    decision = schedule(snap, config=config)
    ids = {j.id for j in snap.queued}
    assert set(decision.placements) | set(decision.pending) == ids
    assert not set(decision.placements) & set(decision.pending)
    assert [p.position for p in decision.pending.values()] == list(range(1, len(decision.pending) + 1))
    etas = forecast_etas(snap, config=config)
    assert set(etas) == ids
    for job_id in decision.placements:
        assert etas[job_id] == NOW
    assert all(eta is None or eta >= NOW for eta in etas.values())


@PROPERTY
@given(snapshots())
def test_what_a_pass_starts_never_delays_a_reservation(case):
    snap, config = case
    decision = schedule(snap, config=config)
    jobs = {j.id: j for j in snap.queued}
    free_after = {n.id: set(n.free_gpu_ids) for n in snap.nodes}
    ends = {}  # GPU id -> when its holder is expected to give it back
    for job in snap.running:
        for ids in job.gpus.values():
            ends.update(dict.fromkeys(ids, expected_end(job)))
    for job_id, where in decision.placements.items():
        for node_id, ids in where:
            free_after[node_id] -= set(ids)
            ends.update(dict.fromkeys(ids, NOW + estimate_of(jobs[job_id])))
    for job_id, reservation in decision.reservations.items():
        job = jobs[job_id]
        base, extra = divmod(job.gpus, job.nodes)
        needs = [base + 1] * extra + [base] * (job.nodes - extra)
        assert len(reservation.nodes) == job.nodes
        for node_id, need in zip(sorted(reservation.nodes), needs, strict=True):
            node = next(n for n in snap.nodes if n.id == node_id)
            usable = [g.gpu_id for g in node.gpus if not job.gpu_memory_mb or g.memory_mb >= job.gpu_memory_mb]
            ready = sum(1 for g in usable if g in free_after[node_id] or ends.get(g, float("inf")) <= reservation.time)
            assert ready >= need


traces = st.lists(
    st.tuples(st.integers(0, 20000), st.integers(0, 8000), st.sampled_from([1, 1, 2, 4, 8, 16]),
              st.sampled_from(["a", "b", "c"])),
    min_size=1, max_size=40,
)


def trace_jobs(rows) -> list[TraceJob]:
    rows = sorted(rows)
    return [TraceJob(i + 1, float(s), float(d), g, t) for i, (s, d, g, t) in enumerate(rows)]


@settings(max_examples=40, deadline=None)
@given(traces, st.sampled_from(["wfq", "fifo", "firstfit"]), st.integers(2, 4))
def test_in_a_replay_every_job_starts_and_the_cluster_is_never_oversubscribed(rows, policy, nodes):
    jobs = trace_jobs(rows)
    # A small preemption mark and minimum run, so that wfq preempts often here.
    config = PolicyConfig(policy=policy, aging_s=3600, preempt_threshold_gpu_s=600, preempt_min_run_s=60)
    outcome = run_trace(jobs, config, nodes, 8, racks=2, restart_s=30, record_runs=True)
    assert all(start >= job.submit for job, start in zip(jobs, outcome.starts, strict=True))
    # Every job ends, having run (over all its runs) at least its duration.
    ran = [0.0] * len(jobs)
    for k, start, stop in outcome.runs:
        ran[k] += stop - start
    for job, end, total in zip(jobs, outcome.ends, ran, strict=True):
        assert end >= job.submit + job.duration
        assert total >= job.duration
    if policy != "wfq":
        assert outcome.preemptions == 0
    events = sorted([(start, jobs[k].gpus) for k, start, _ in outcome.runs]
                    + [(stop, -jobs[k].gpus) for k, _, stop in outcome.runs],
                    key=lambda e: (e[0], e[1]))
    in_use = 0
    for _, delta in events:
        in_use += delta
        assert in_use <= nodes * 8


@settings(max_examples=30, deadline=None)
@given(traces, st.integers(0, 39), st.integers(0, 100000), st.sampled_from(["wfq", "firstfit"]))
def test_a_replay_never_reads_a_run_time_before_the_job_ends(rows, which, other_duration, policy):
    jobs = trace_jobs(rows)
    k = which % len(jobs)
    changed = [j if i != k else TraceJob(j.row, j.submit, float(other_duration), j.gpus, j.tenant)
               for i, j in enumerate(jobs)]
    config = PolicyConfig(policy=policy)
    first, second = simulate(jobs, config, 3, 8), simulate(changed, config, 3, 8)
    # Until job k ends in either run, the two runs saw the same events, so they made the same choices.
    horizon = first[k] + min(jobs[k].duration, changed[k].duration)
    for a, b in zip(first, second, strict=True):
        if a < horizon or b < horizon:
            assert a == b
