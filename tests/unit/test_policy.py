"""The scheduling policy core: placement, quotas, order, backfill, reasons and ETAs, on hand-made snapshots."""
from __future__ import annotations

import math
import time
from dataclasses import replace

import pytest

from apps.scheduling.policy import (
    GpuSpec,
    NodeSpec,
    PolicyConfig,
    QueuedJob,
    RunningJob,
    RuntimeEstimator,
    Snapshot,
    TeamSpec,
    decayed_usage,
    forecast_etas,
    schedule,
)

NOW = 1_760_000_000.0  # an epoch time, so reasons print wall-clock times
GB = 1024


def node(node_id: int, gpus: int = 8, *, rack: str = "r1", state: str = "active", memory_gb: int = 80,
         busy: tuple[int, ...] = (), memories: tuple[int, ...] | None = None) -> NodeSpec:
    """A node whose GPU ids are node_id * 100 + index; `busy` lists indexes that are not free."""
    memories = memories or (memory_gb,) * gpus
    specs = tuple(GpuSpec(gpu_id=node_id * 100 + i, index=i, memory_mb=memories[i] * GB) for i in range(gpus))
    free = frozenset(g.gpu_id for g in specs if g.index not in busy)
    return NodeSpec(id=node_id, name=f"node-{node_id}", rack=rack, state=state, gpus=specs, free_gpu_ids=free)


def queued(job_id: int, team: int = 1, gpus: int = 1, *, submit: float = NOW - 60, nodes: int = 1,
           kind: str = "training", priority: str = "normal", memory_gb: float | None = None,
           walltime_s: float | None = 3600.0) -> QueuedJob:
    return QueuedJob(
        id=job_id, team=team, kind=kind, gpus=gpus, nodes=nodes, submit=submit, priority=priority,
        gpu_memory_mb=None if memory_gb is None else int(memory_gb * GB), walltime_s=walltime_s,
    )


def running(job_id: int, node_id: int, indexes: tuple[int, ...], *, team: int = 1, ends_in: float = 3600.0,
            started: float = NOW - 600) -> RunningJob:
    return RunningJob(
        id=job_id, team=team, kind="training", gpus={node_id: tuple(node_id * 100 + i for i in indexes)},
        start=started, estimated_end=NOW + ends_in,
    )


def team(team_id: int, name: str | None = None, **quotas) -> TeamSpec:
    return TeamSpec(id=team_id, name=name or f"T{team_id}", **quotas)


def snap(nodes, queue, *, run=(), teams=(), **extra) -> Snapshot:
    return Snapshot(now=NOW, nodes=list(nodes), running=list(run), queued=list(queue), teams=list(teams), **extra)


def gpus_of(decision, job_id) -> dict:
    return {node_id: sorted(ids) for node_id, ids in decision.placements[job_id]}


# -- placement ---------------------------------------------------------------------------------------
def test_a_job_that_fits_one_node_goes_to_the_fullest_node_it_fits():
    nodes = [node(1, busy=(0, 1)), node(2, busy=(0, 1, 2, 3, 4)), node(3)]
    decision = schedule(snap(nodes, [queued(10, gpus=3)]))
    assert gpus_of(decision, 10) == {2: [205, 206, 207]}


def test_a_multi_node_job_takes_whole_nodes_in_one_rack_when_one_rack_can_hold_it():
    nodes = [node(1, rack="a"), node(2, rack="b"), node(3, rack="b"), node(4, rack="a", busy=(0,))]
    decision = schedule(snap(nodes, [queued(10, gpus=16, nodes=2)]))
    placed = gpus_of(decision, 10)
    assert set(placed) == {2, 3}
    assert all(len(ids) == 8 for ids in placed.values())


def test_a_multi_node_job_spans_racks_when_no_rack_can_hold_it_alone():
    nodes = [node(1, rack="a"), node(2, rack="b"), node(3, rack="c", busy=(0,))]
    decision = schedule(snap(nodes, [queued(10, gpus=16, nodes=2)]))
    assert set(gpus_of(decision, 10)) == {1, 2}


def test_gpu_memory_requests_only_get_gpus_with_that_much_memory():
    mixed = node(1, memories=(24, 24, 24, 24, 80, 80, 80, 80))
    decision = schedule(snap([mixed], [queued(10, gpus=2, memory_gb=40), queued(11, gpus=2)]))
    assert gpus_of(decision, 10) == {1: [104, 105]}
    # The job that asked for nothing gets the small GPUs, leaving the big ones for those who ask.
    assert gpus_of(decision, 11) == {1: [100, 101]}


@pytest.mark.parametrize("state", ["draining", "standby", "down"])
def test_only_active_nodes_get_new_work(state):
    decision = schedule(snap([node(1, state=state), node(2, busy=(0, 1, 2, 3, 4, 5, 6))], [queued(10, gpus=2)]))
    assert decision.placements == {}
    assert decision.pending[10].code == "capacity"


def test_a_gang_starts_whole_or_not_at_all():
    # Eight GPUs are free in all, but no node has eight: nothing of the job starts.
    nodes = [node(1, busy=(0, 1, 2, 3)), node(2, busy=(0, 1, 2, 3))]
    decision = schedule(snap(nodes, [queued(10, gpus=8)]))
    assert decision.placements == {}
    assert decision.pending[10].code == "capacity"


# -- quotas ------------------------------------------------------------------------------------------
def test_it_holds_a_job_that_would_take_its_team_over_max_gpus():
    teams = [team(1, "A", max_gpus=8)]
    run = [running(1, 1, tuple(range(8)))]
    decision = schedule(snap([node(1, busy=tuple(range(8))), node(2)], [queued(10)], run=run, teams=teams))
    assert decision.placements == {}
    assert decision.pending[10].code == "max_gpus"
    assert decision.pending[10].reason == "team A is at 8/8 GPUs"


def test_it_starts_what_fits_under_max_gpus_and_holds_the_rest():
    teams = [team(1, "A", max_gpus=4)]
    decision = schedule(snap([node(1)], [queued(10, gpus=3), queued(11, gpus=2), queued(12, gpus=1)], teams=teams))
    assert set(decision.placements) == {10, 12}
    assert decision.pending[11].reason == "team A is at 4/4 GPUs"


def test_it_never_starts_a_job_over_max_gpus_per_job_and_says_why():
    teams = [team(1, "A", max_gpus_per_job=4)]
    decision = schedule(snap([node(1)], [queued(10, gpus=8)], teams=teams))
    assert decision.placements == {}
    assert decision.pending[10].code == "quota_per_job"
    assert decision.pending[10].reason == "asks for 8 GPUs; team A may use at most 4 per job"
    assert forecast_etas(snap([node(1)], [queued(10, gpus=8)], teams=teams)) == {10: None}


def test_it_holds_a_team_that_would_go_over_its_monthly_gpu_hours():
    # 95 of 100 GPU-hours used; a 2-GPU job of 4 hours would need 8 more.
    teams = [team(1, "A", gpu_hours_per_month=100, gpu_seconds_used_this_month=95 * 3600)]
    decision = schedule(snap([node(1)], [queued(10, gpus=2, walltime_s=4 * 3600), queued(11, walltime_s=3600)],
                             teams=teams))
    assert set(decision.placements) == {11}
    assert decision.pending[10].code == "month_quota"
    assert decision.pending[10].reason.startswith("over the monthly GPU-hour quota")


# -- order -------------------------------------------------------------------------------------------
def test_a_team_that_used_the_cluster_heavily_yields_to_one_that_did_not():
    teams = [team(1, "heavy", decayed_usage=50 * 3600 * 8), team(2, "light")]
    queue = [queued(10, team=1, submit=NOW - 600), queued(11, team=2, submit=NOW - 60)]
    decision = schedule(snap([node(1, busy=tuple(range(7)))], queue, teams=teams))
    assert set(decision.placements) == {11}
    assert decision.pending[10].code == "reserved"


def test_without_history_the_earlier_job_of_equal_cost_goes_first():
    queue = [queued(10, team=1, submit=NOW - 600), queued(11, team=2, submit=NOW - 60)]
    decision = schedule(snap([node(1, busy=tuple(range(7)))], queue))
    assert set(decision.placements) == {10}


def test_a_heavier_team_gets_the_larger_share_of_a_contended_cluster():
    teams = [team(1, weight=3.0), team(2, weight=1.0)]
    queue = [queued(100 + i, team=1 + i % 2, submit=NOW - 1000 + i) for i in range(40)]
    decision = schedule(snap([node(1)], queue, teams=teams))
    started = [job_id for job_id in decision.placements]
    by_team = {1: sum(1 for j in started if (j - 100) % 2 == 0), 2: sum(1 for j in started if (j - 100) % 2 == 1)}
    assert by_team == {1: 6, 2: 2}


def test_an_urgent_job_goes_ahead_of_its_teams_normal_ones():
    queue = [queued(10, submit=NOW - 600), queued(11, submit=NOW - 500), queued(12, priority="urgent", submit=NOW - 60)]
    decision = schedule(snap([node(1, busy=tuple(range(7)))], queue, teams=[team(1), team(2)]))
    # Within one flow WFQ keeps arrival order; urgency shows across flows: an urgent job of another
    # team passes a normal one.
    assert set(decision.placements) == {10}
    queue = [queued(10, team=1, submit=NOW - 600), queued(11, team=2, priority="urgent", submit=NOW - 60)]
    decision = schedule(snap([node(1, busy=tuple(range(7)))], queue, teams=[team(1), team(2)]))
    assert set(decision.placements) == {11}


def test_a_job_past_the_aging_bound_goes_before_younger_ones_however_heavy_its_team():
    teams = [team(1, "heavy", decayed_usage=1e9), team(2, "light")]
    config = PolicyConfig(aging_s=3600)
    queue = [queued(10, team=1, submit=NOW - 7200), queued(11, team=2, submit=NOW - 60)]
    decision = schedule(snap([node(1, busy=tuple(range(7)))], queue, teams=teams), config=config)
    assert set(decision.placements) == {10}


def test_fifo_never_lets_a_job_pass_the_first_one_that_cannot_start():
    nodes = [node(1, busy=(0, 1, 2, 3))]
    queue = [queued(10, gpus=8, submit=NOW - 600), queued(11, gpus=1, submit=NOW - 60)]
    fifo = schedule(snap(nodes, queue), config=PolicyConfig(policy="fifo"))
    assert fifo.placements == {}
    assert fifo.pending[11].code == "order"
    firstfit = schedule(snap(nodes, queue), config=PolicyConfig(policy="firstfit"))
    assert set(firstfit.placements) == {11}


# -- backfill ----------------------------------------------------------------------------------------
def test_the_first_blocked_job_is_reserved_and_a_short_job_backfills_before_its_time():
    nodes = [node(1, busy=(0, 1, 2, 3))]
    run = [running(1, 1, (0, 1, 2, 3), ends_in=2 * 3600)]
    queue = [queued(10, gpus=8, submit=NOW - 600), queued(11, gpus=2, walltime_s=3600, submit=NOW - 60)]
    decision = schedule(snap(nodes, queue, run=run))
    assert decision.reservations[10].time == NOW + 2 * 3600
    assert decision.reservations[10].nodes == (1,)
    assert set(decision.placements) == {11}


def test_a_long_job_may_not_delay_the_reservation():
    nodes = [node(1, busy=(0, 1, 2, 3))]
    run = [running(1, 1, (0, 1, 2, 3), ends_in=2 * 3600)]
    queue = [queued(10, gpus=8, submit=NOW - 600), queued(11, gpus=2, walltime_s=5 * 3600, submit=NOW - 60)]
    decision = schedule(snap(nodes, queue, run=run))
    assert decision.placements == {}
    assert decision.pending[11].code == "reservation"


def test_a_long_job_may_take_gpus_the_reserved_job_will_not_need():
    nodes = [node(1, busy=(0, 1, 2, 3))]
    run = [running(1, 1, (0, 1, 2, 3), ends_in=2 * 3600)]
    queue = [queued(10, gpus=4, submit=NOW - 600, walltime_s=3600), queued(11, gpus=2, walltime_s=9 * 3600)]
    # Job 10 starts at once (4 free); then nothing is blocked and job 11 waits only for room.
    decision = schedule(snap(nodes, queue, run=run))
    assert set(decision.placements) == {10}
    nodes = [node(1, busy=(0, 1, 2, 3, 4, 5)), node(2, busy=(0, 1, 2, 3, 4))]
    run = [running(1, 1, (0, 1, 2, 3, 4, 5), ends_in=3600), running(2, 2, (0, 1, 2, 3, 4), ends_in=7200)]
    queue = [queued(10, gpus=6, submit=NOW - 600), queued(11, gpus=2, walltime_s=9 * 3600, submit=NOW - 60)]
    decision = schedule(snap(nodes, queue, run=run))
    # Job 10 is reserved on node 1 at +1 h for 6 of its 8 GPUs; job 11 runs long but fits in the other 2.
    assert decision.reservations[10].nodes == (1,)
    assert gpus_of(decision, 11) == {1: [106, 107]}


def test_an_overrunning_job_is_expected_to_run_as_long_again():
    nodes = [node(1, busy=(0, 1, 2, 3, 4, 5, 6, 7))]
    run = [running(1, 1, tuple(range(8)), started=NOW - 3600, ends_in=-1800)]  # expected 30 min, ran 1 h
    # (Without preemption: it has run 8 GPU-hours, past the mark, and job 10 would preempt it.)
    decision = schedule(snap(nodes, [queued(10, gpus=8)], run=run), config=PolicyConfig(preemption=False))
    assert decision.reservations[10].time == NOW + 3600  # 30 min, doubled twice: 2 h after its start


# -- reasons -----------------------------------------------------------------------------------------
def test_every_queued_job_gets_a_position_flow_tags_and_reason_in_order():
    nodes = [node(1, busy=tuple(range(8)))]
    run = [running(1, 1, tuple(range(8)), team=2)]
    queue = [queued(10 + i, team=1 + i % 2, kind=("training", "compression")[i % 2]) for i in range(6)]
    decision = schedule(snap(nodes, queue, run=run, teams=[team(1, "A"), team(2, "B")]))
    assert set(decision.pending) == {10, 11, 12, 13, 14, 15}
    assert [p.position for p in decision.pending.values()] == [1, 2, 3, 4, 5, 6]
    assert decision.pending[10].flow == "A/training"
    assert decision.pending[11].flow == "B/compression"
    for pending in decision.pending.values():
        assert pending.finish_tag > pending.start_tag
        assert pending.reason
    assert decision.pending[12].reason == "no active node has 1 GPU free; behind 2 jobs of higher fair-share priority"


def test_the_reserved_multi_node_job_says_how_many_nodes_where_and_when():
    nodes = [node(1, rack="a", busy=(0,)), node(2, rack="a", busy=(0,)), node(3, rack="b", busy=(0,))]
    run = [running(1, 1, (0,), ends_in=3600), running(2, 2, (0,), ends_in=3600), running(3, 3, (0,), ends_in=3600)]
    decision = schedule(snap(nodes, [queued(10, gpus=16, nodes=2)], run=run))
    assert decision.reservations[10].nodes == (1, 2)
    at = time.strftime("%H:%M", time.gmtime(NOW + 3600))
    reason = f"waiting for 2 whole nodes in one rack; reserved for {at} UTC (in 1 h 00 min)"
    assert decision.pending[10].reason == reason


def test_a_multi_node_job_is_reserved_across_racks_when_that_is_sooner():
    nodes = [node(1, rack="a", busy=(0,)), node(2, rack="a", busy=(0,)), node(3, rack="b")]
    run = [running(1, 1, (0,), ends_in=3600), running(2, 2, (0,), ends_in=2 * 3600)]
    decision = schedule(snap(nodes, [queued(10, gpus=16, nodes=2)], run=run))
    assert decision.reservations[10].nodes == (1, 3)
    assert decision.reservations[10].time == NOW + 3600
    assert decision.pending[10].reason.startswith("waiting for 2 whole nodes; reserved for")


def test_a_job_no_active_node_can_ever_hold_says_so():
    decision = schedule(snap([node(1, memory_gb=24), node(2, state="down")], [queued(10, gpus=4, memory_gb=80)]))
    assert decision.pending[10].code == "never_fits"
    assert decision.pending[10].reason == "no active node has 4 GPUs with 80 GB"


def test_stamped_tags_come_back_and_keep_the_order():
    nodes = [node(1, busy=tuple(range(8)))]
    queue = [queued(10 + i, team=1 + i % 3, submit=NOW - 100 + i) for i in range(6)]
    first = schedule(snap(nodes, queue, teams=[team(1), team(2), team(3)]))
    restamped = [replace(job, estimated_runtime_s=first.stamps[job.id][0], start_tag=first.stamps[job.id][1],
                         finish_tag=first.stamps[job.id][2]) for job in queue]
    again = schedule(snap(nodes, restamped, teams=[team(1), team(2), team(3)],
                          virtual_time=first.virtual_time, flow_finish=first.flow_finish))
    assert list(again.pending) == list(first.pending)
    assert again.stamps == first.stamps


# -- ETAs --------------------------------------------------------------------------------------------
def test_etas_follow_the_estimated_ends_of_running_jobs():
    nodes = [node(1, busy=tuple(range(8)))]
    run = [running(1, 1, (0, 1, 2, 3), ends_in=600), running(2, 1, (4, 5, 6, 7), ends_in=1800)]
    queue = [queued(10, gpus=4, walltime_s=1000, submit=NOW - 60), queued(11, gpus=8, walltime_s=100, submit=NOW - 30)]
    etas = forecast_etas(snap(nodes, queue, run=run))
    assert etas == {10: NOW + 600, 11: NOW + 1800}


def test_a_coarser_resolution_plays_close_ends_as_one_event():
    nodes = [node(1, busy=tuple(range(8)))]
    run = [running(1, 1, (0, 1, 2, 3), ends_in=600), running(2, 1, (4, 5, 6, 7), ends_in=620)]
    queue = [queued(10, gpus=4, walltime_s=1000, submit=NOW - 60), queued(11, gpus=4, walltime_s=100, submit=NOW - 30)]
    s = snap(nodes, queue, run=run)
    assert forecast_etas(s) == {10: NOW + 600, 11: NOW + 620}
    # The two ends, 20 s apart, become one event at the later one: both jobs start then.
    assert forecast_etas(s, resolution_s=30) == {10: NOW + 620, 11: NOW + 620}
    # Ends further apart than the resolution stay separate events.
    assert forecast_etas(s, resolution_s=10) == {10: NOW + 600, 11: NOW + 620}


def test_the_eta_of_a_reserved_job_is_its_reservation_time():
    nodes = [node(1, busy=(0, 1, 2, 3)), node(2, busy=(0, 1))]
    run = [running(1, 1, (0, 1, 2, 3), ends_in=3000), running(2, 2, (0, 1), ends_in=5000)]
    queue = [queued(10, gpus=8, submit=NOW - 60), queued(11, gpus=1, walltime_s=600)]
    s = snap(nodes, queue, run=run)
    decision = schedule(s)
    assert forecast_etas(s)[10] == decision.reservations[10].time == NOW + 3000


def test_eta_is_none_for_a_job_that_can_never_start():
    assert forecast_etas(snap([node(1, gpus=4)], [queued(10, gpus=8)])) == {10: None}


# -- estimates and fair-share memory -----------------------------------------------------------------
def test_the_estimate_is_the_walltime_when_the_job_gives_one():
    estimator = RuntimeEstimator()
    estimator.observe_many([("A", "training", 1, 60.0)] * 10)
    assert estimator.estimate("A", "training", 1, walltime_s=7200) == 7200


def test_the_estimate_learns_from_the_same_team_and_kind_and_falls_back_to_the_prior():
    config = PolicyConfig(runtime_priors_s={"training": 5000.0, "compression": 900.0})
    estimator = RuntimeEstimator(config)
    assert estimator.estimate("A", "training", 1) == 5000.0
    estimator.observe_many([("A", "training", 1, t) for t in (100.0, 200.0, 300.0)])
    assert estimator.estimate("A", "training", 1) == 200.0
    assert estimator.estimate("A", "training", 4) == 200.0  # no 4-GPU history: the team and kind's
    assert estimator.estimate("B", "training", 1) == 200.0  # no team history: the kind's
    assert estimator.estimate("B", "compression", 1) == 900.0  # nothing at all: the kind's prior


def test_decayed_usage_halves_with_each_half_life():
    day = 86400.0
    one_gpu_day_ago = [(NOW - 2 * day, NOW - day, 1)]
    fresh = decayed_usage([(NOW - day, NOW, 1)], NOW, half_life_s=day)
    older = decayed_usage(one_gpu_day_ago, NOW, half_life_s=day)
    assert older == pytest.approx(fresh / 2)
    assert fresh == pytest.approx(day / 2 / math.log(2))
    assert decayed_usage(one_gpu_day_ago, NOW, half_life_s=0) == 0.0


def test_a_team_nobody_described_weighs_one_and_has_no_limits():
    decision = schedule(snap([node(1)], [queued(10, team=99, gpus=8)], teams=[TeamSpec(id=1, name="A")]))
    assert set(decision.placements) == {10}


def test_a_config_with_an_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="policy must be one of"):
        PolicyConfig(policy="lottery")
