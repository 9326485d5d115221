"""Preemption in the policy core (two-class least attained service) and in the trace replay."""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest

from apps.scheduling.policy import PolicyConfig, QueuedJob, RunningJob, Scheduler, forecast_etas, schedule
from apps.scheduling.replay import TraceJob, load_trace, metrics, run_trace
from tests.unit.test_policy import NOW, node, queued, snap, team

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"

HOUR = 3600.0


def running(job_id: int, node_id: int, indexes: tuple[int, ...], *, ran_for: float, kind: str = "training",
            ran_s: float = 0.0, preemptions: int = 0, preempting: bool = False, team: int = 1) -> RunningJob:
    """A job that started `ran_for` seconds ago on node_id's GPUs `indexes`, expected to run 10 h more."""
    return RunningJob(
        id=job_id, team=team, kind=kind, gpus={node_id: tuple(node_id * 100 + i for i in indexes)},
        start=NOW - ran_for, estimated_end=NOW + 10 * HOUR, ran_s=ran_s, preemptions=preemptions,
        preempting=preempting,
    )


FULL = tuple(range(8))


def test_a_new_job_preempts_a_job_past_the_mark_and_waits_for_it_live():
    # Job 1 has run 8 GPUs x 1 h = 8 GPU-hours (mark: 4), for longer than the 30 min minimum.
    decision = schedule(snap([node(1, busy=FULL)], [queued(10, gpus=8)], run=[running(1, 1, FULL, ran_for=HOUR)]))
    assert set(decision.preemptions) == {1}
    assert "job 10 of the same team" in decision.preemptions[1]
    assert "8.0 GPU-hours" in decision.preemptions[1]
    # Live, the GPUs come back only when the worker confirms: job 10 is not placed in this pass.
    assert decision.placements == {}
    assert decision.pending[10].code == "preempting"
    assert "stopping 1 running job that ran past 4 GPU-hours" in decision.pending[10].reason


def test_the_free_gpus_of_a_node_held_for_a_preempting_job_are_not_offered_in_the_reasons():
    # Node 1: a 7-GPU job past the mark and 1 free GPU. Job 10 (8 GPUs, 8 GPU-hours) goes first, stops
    # the 7-GPU job and holds the node; job 11 (1 GPU for 100 h, another team) cannot have that free
    # GPU, and its reason says so.
    run = [running(1, 1, FULL[:7], ran_for=HOUR)]
    jobs = [queued(10, gpus=8), queued(11, team=2, gpus=1, walltime_s=100 * HOUR)]
    decision = schedule(snap([node(1, busy=FULL[:7])], jobs, run=run))
    assert set(decision.preemptions) == {1}
    assert decision.placements == {}
    assert decision.pending[11].code == "capacity"
    assert decision.pending[11].reason.startswith("no active node has 1 GPU free")


def test_jobs_under_the_mark_too_young_or_of_another_kind_are_not_preempted():
    nodes = [node(1, busy=FULL)]
    cases = [
        running(1, 1, (0,), ran_for=2 * HOUR),  # 1 GPU x 2 h = 2 GPU-hours: under the mark
        running(1, 1, FULL, ran_for=20 * 60, ran_s=10 * HOUR),  # past the mark, but only 20 min this attempt
        running(1, 1, FULL, ran_for=HOUR, kind="compression"),  # compression restarts from scratch
        running(1, 1, FULL, ran_for=HOUR, preemptions=2),  # at the per-job limit below
    ]
    config = PolicyConfig(max_preemptions_per_job=2)
    for job in cases:
        busy = node(1, busy=tuple(range(len(job.gpus[1])))) if len(job.gpus[1]) < 8 else nodes[0]
        decision = schedule(snap([busy], [queued(10, gpus=8)], run=[job]), config=config)
        assert decision.preemptions == {}, job
        assert decision.pending[10].code != "preempting"
    # The same job past the mark, old enough and under the limit is preempted.
    decision = schedule(snap(nodes, [queued(10, gpus=8)], run=[running(1, 1, FULL, ran_for=HOUR, preemptions=1)]),
                        config=config)
    assert set(decision.preemptions) == {1}


def test_preemption_can_be_switched_off_and_never_happens_under_fifo():
    args = ([node(1, busy=FULL)], [queued(10, gpus=8)])
    run = [running(1, 1, FULL, ran_for=HOUR)]
    for config in (PolicyConfig(preemption=False), PolicyConfig(policy="fifo"), PolicyConfig(policy="firstfit")):
        assert schedule(snap(*args, run=run), config=config).preemptions == {}


def test_it_stops_the_fewest_gpus():
    # Node 1: 2 free, a 6-GPU job past the mark. Node 2: 2 free, two 2-GPU jobs and a 2-GPU job past
    # the mark. A 4-GPU job needs 2 more: stopping the 2-GPU job (node 2) costs less than the 6-GPU one.
    nodes = [node(1, busy=(0, 1, 2, 3, 4, 5)), node(2, busy=(0, 1, 2, 3, 4, 5))]
    run = [
        running(1, 1, (0, 1, 2, 3, 4, 5), ran_for=HOUR),
        running(2, 2, (0, 1), ran_for=3 * HOUR),  # 6 GPU-hours
        running(3, 2, (2, 3), ran_for=HOUR),  # 2 GPU-hours: under the mark
        running(4, 2, (4, 5), ran_for=HOUR),
    ]
    decision = schedule(snap(nodes, [queued(10, gpus=4)], run=run))
    assert set(decision.preemptions) == {2}


def test_a_job_already_being_stopped_is_waited_for_not_preempted_again():
    run = [running(1, 1, FULL, ran_for=HOUR, preempting=True), running(2, 2, FULL, ran_for=HOUR)]
    snapshot = snap([node(1, busy=FULL), node(2, busy=FULL)], [queued(10, gpus=8)], run=run)
    decision = schedule(snapshot)
    assert decision.preemptions == {}
    # Its ETA: when the stopping job is expected gone (within the grace), not hours later.
    assert NOW <= forecast_etas(snapshot)[10] <= NOW + PolicyConfig().overrun_grace_s
    assert decision.pending[10].code == "preempting"
    assert "stopping 1 running job" in decision.pending[10].reason


def test_whole_node_jobs_take_the_cheapest_nodes():
    # Two whole nodes for a 16-GPU job: node 3 is free, node 1 holds one 8-GPU job past the mark, node 2
    # holds two 4-GPU jobs past the mark; nodes 1 and 2 cost 8 GPUs each, so one of them and node 3.
    nodes = [node(1, busy=FULL), node(2, busy=FULL), node(3)]
    run = [running(1, 1, FULL, ran_for=HOUR), running(2, 2, (0, 1, 2, 3), ran_for=2 * HOUR),
           running(3, 2, (4, 5, 6, 7), ran_for=2 * HOUR)]
    decision = schedule(snap(nodes, [queued(10, gpus=16, nodes=2)], run=run))
    assert set(decision.preemptions) == {1}


def test_a_job_past_the_mark_goes_after_new_jobs_and_says_why():
    served = replace(queued(5, gpus=1, submit=NOW - 3 * HOUR), ran_s=5 * HOUR)  # 5 GPU-hours already
    fresh = queued(6, gpus=1, submit=NOW - 60)
    decision = schedule(snap([node(1, busy=FULL[1:])], [served, fresh]))
    assert set(decision.placements) == {6}
    assert "5.0 GPU-hours already" in decision.pending[5].reason
    # Without preemption the order is WFQ's: the earlier job goes first.
    decision = schedule(snap([node(1, busy=FULL[1:])], [served, fresh]), config=PolicyConfig(preemption=False))
    assert set(decision.placements) == {5}


def test_among_jobs_past_the_mark_the_one_that_would_end_with_the_larger_slowdown_goes_first():
    # Both ran 5 h. Job 5 (a heavy team's) has 19 h left and was submitted 6 h ago: started now it ends
    # at (6 + 19) / (5 + 19) = 1.04x its run. Job 6 (a light team's) has 1 h left and was submitted 10 h
    # ago: (10 + 1) / (5 + 1) = 1.83x. WFQ's tags put job 5 first (19 h / weight 4 < 1 h / weight 0.1).
    long_one = replace(queued(5, team=1, submit=NOW - 6 * HOUR, walltime_s=24 * HOUR), ran_s=5 * HOUR)
    short_one = replace(queued(6, team=2, submit=NOW - 10 * HOUR, walltime_s=6 * HOUR), ran_s=5 * HOUR)
    teams = [replace(team(1), weight=4.0), replace(team(2), weight=0.1)]
    args = ([node(1, busy=FULL[1:])], [long_one, short_one])
    decision = schedule(snap(*args, teams=teams))
    assert set(decision.placements) == {6}
    assert "would end at 1.0x its run time" in decision.pending[5].reason
    assert decision.pending[5].position == 1
    decision = schedule(snap(*args, teams=teams), config=PolicyConfig(served_order="wfq"))
    assert set(decision.placements) == {5}
    assert "would end at" not in decision.pending[6].reason


def test_served_positions_follow_the_pass_which_takes_each_sub_queue_in_its_own_order():
    # Jobs 1 and 2 share a flow and shape: job 1 (earlier) heads that served sub-queue although job 2
    # would end with the larger slowdown; job 3 is another team's. Slowdowns if started now: job 1
    # (12 + 37) / (11 + 37) = 1.02, job 2 (10 + 1) / (5 + 1) = 1.83, job 3 (8 + 5) / (5 + 5) = 1.3.
    jobs = [replace(queued(1, team=1, submit=NOW - 12 * HOUR, walltime_s=48 * HOUR), ran_s=11 * HOUR),
            replace(queued(2, team=1, submit=NOW - 10 * HOUR, walltime_s=6 * HOUR), ran_s=5 * HOUR),
            replace(queued(3, team=2, submit=NOW - 8 * HOUR, walltime_s=10 * HOUR), ran_s=5 * HOUR)]
    decision = schedule(snap([node(1, busy=FULL)], jobs))
    assert sorted(decision.pending, key=lambda j: decision.pending[j].position) == [3, 1, 2]
    # The pass agrees: with one GPU free it takes job 3, then job 1 (the head of its sub-queue).
    assert set(schedule(snap([node(1, busy=FULL[1:])], jobs)).placements) == {3}
    assert set(schedule(snap([node(1, busy=FULL[1:])], jobs[:2])).placements) == {1}


def test_an_unknown_served_order_is_refused():
    with pytest.raises(ValueError, match="served_order must be one of slowdown, wfq"):
        PolicyConfig(served_order="oldest")


def test_a_resumed_job_is_expected_to_run_what_is_left_of_its_estimate():
    sched = Scheduler(PolicyConfig(), now=NOW)
    entry = sched.enqueue(replace(queued(5, walltime_s=4 * HOUR), ran_s=3 * HOUR))
    assert entry.est == HOUR
    entry = sched.enqueue(replace(queued(6, walltime_s=4 * HOUR), ran_s=10 * HOUR))
    assert entry.est == PolicyConfig().overrun_grace_s


def test_the_eta_of_a_job_that_will_preempt_is_now():
    run = [running(1, 1, FULL, ran_for=HOUR)]
    etas = forecast_etas(snap([node(1, busy=FULL)], [queued(10, gpus=8)], run=run))
    assert etas[10] == NOW
    etas = forecast_etas(snap([node(1, busy=FULL)], [queued(10, gpus=8)], run=run),
                         config=PolicyConfig(preemption=False))
    assert etas[10] == NOW + 10 * HOUR


def test_the_forecast_plays_a_preempted_job_back_into_the_queue():
    # One node. Job 1 (team 2, 8 GPUs, past the mark, 10 h to go) runs; job 10 is new (1 h); job 5 (team
    # 1, which used the cluster heavily) has run 5 h before and waits. Job 10 preempts job 1 at once; when
    # it ends, jobs 1 and 5 are both past the mark and team 2's job 1 goes first: job 5 waits for it.
    run = [running(1, 1, FULL, ran_for=HOUR, team=2)]
    served = replace(queued(5, gpus=8, submit=NOW - 3 * HOUR, walltime_s=HOUR), ran_s=5 * HOUR)
    teams = [team(1, decayed_usage=1e9), team(2)]
    snapshot = snap([node(1, busy=FULL)], [served, queued(10, gpus=8, walltime_s=HOUR, team=2)], run=run,
                    teams=teams)
    etas = forecast_etas(snapshot)
    assert set(etas) == {5, 10}  # ETAs of queued jobs only, not of the preempted running one
    assert etas[10] == NOW
    # Had job 1 vanished when preempted (as the forecast used to play it), job 5 would start at +1 h.
    assert etas[5] > NOW + 2 * HOUR


def test_a_forecast_job_that_starts_and_is_later_preempted_keeps_its_eta():
    # Job 10 (10 h) starts now; job 11 (1 h) waits until job 10 is past the mark, 30 min in (8 GPUs x
    # 30 min = 4 GPU-hours, and the minimum run), and preempts it then: the forecast runs a pass at that
    # moment, and job 10's ETA stays the time it first started.
    queue = [queued(10, gpus=8, walltime_s=10 * HOUR, submit=NOW - 120), queued(11, gpus=8, walltime_s=HOUR)]
    etas = forecast_etas(snap([node(1)], queue))
    assert etas == {10: NOW, 11: NOW + 1800}


# -- the replay --------------------------------------------------------------------------------------
def trace_job(row: int, submit: float, duration: float, gpus: int, tenant: str) -> TraceJob:
    return TraceJob(row, submit, duration, gpus, tenant)


def test_the_replay_preempts_requeues_and_charges_the_restart():
    # A 10,000 s whole-node job; an hour later a 600 s whole-node job of another team. From 30 min on the
    # first has run 4 GPU-hours, so the second preempts it at once, and it resumes when that one ends,
    # 300 s of restart (as asked here; the replay's default is RESTART_S) on top of the 6,400 s it still had to run.
    jobs = [trace_job(1, 0.0, 10_000.0, 8, "a"), trace_job(2, 3600.0, 600.0, 8, "b")]
    outcome = run_trace(jobs, PolicyConfig(), nodes=1, gpus_per_node=8, restart_s=300.0)
    assert outcome.starts == [0.0, 3600.0]
    assert outcome.ends == [4200.0 + 6400.0 + 300.0, 4200.0]
    assert (outcome.preemptions, outcome.preempted_jobs) == (1, 1)
    result = metrics(jobs, outcome.starts, 8, outcome.ends)
    # Waits are the time not making progress: 600 s queued again plus 300 s restarting, and none.
    assert result["mean_wait_s"] == 450.0
    assert result["p99_wait_s"] <= 900.0
    # Without preemption the short job waits for the long one.
    plain = run_trace(jobs, PolicyConfig(preemption=False), nodes=1, gpus_per_node=8)
    assert plain.starts == [0.0, 10_000.0]
    assert plain.preemptions == 0
    assert metrics(jobs, plain.starts, 8, plain.ends)["mean_wait_s"] == 3200.0


def test_the_replay_never_preempts_before_the_minimum_run():
    jobs = [trace_job(1, 0.0, 10_000.0, 8, "a"), trace_job(2, 600.0, 600.0, 8, "b")]
    outcome = run_trace(jobs, PolicyConfig(), nodes=1, gpus_per_node=8)
    # Job 1 becomes preemptible at 1,800 s (30 min run, 4 GPU-hours); job 2 waits for that, not to 10,000 s.
    assert outcome.starts == [0.0, 1800.0]
    assert outcome.preemptions == 1


def test_every_job_of_the_real_sample_ends_and_the_work_is_the_same():
    jobs = load_trace(FIXTURES / "philly-sample.csv")
    with_ = run_trace(jobs, PolicyConfig(), nodes=8, gpus_per_node=8)
    without = run_trace(jobs, PolicyConfig(preemption=False), nodes=8, gpus_per_node=8)
    assert not any(math.isnan(e) for e in with_.ends)
    assert with_.preemptions > 0
    for outcome in (with_, without):
        for job, start, end in zip(jobs, outcome.starts, outcome.ends, strict=True):
            assert job.submit <= start
            assert end >= start + job.duration
    # Without preemption every job runs start to start + duration.
    assert all(e == s + j.duration for j, s, e in zip(jobs, without.starts, without.ends, strict=True))


def test_requeued_jobs_keep_their_identity_in_the_scheduler():
    # Preempted in a pass, requeued with what they ran: the core counts one running job per id and never
    # over-allocates a node (ClusterState.allocate raises if it would).
    sched = Scheduler(PolicyConfig(), now=0.0)
    sched.cluster.add_node(1, "n1", "r", True, ((i, i, 81920) for i in range(8)))
    sched.enqueue(QueuedJob(id="long", team="a", kind="training", gpus=8, submit=0.0, walltime_s=10 * HOUR))
    assert set(sched.schedule_pass(0.0).placements) == {"long"}
    sched.enqueue(QueuedJob(id="short", team="b", kind="training", gpus=8, submit=HOUR, walltime_s=600))
    decision = sched.schedule_pass(HOUR)
    assert set(decision.preemptions) == {"long"}
    assert set(decision.placements) == {"short"}
    assert set(sched.running) == {"short"}
    sched.enqueue(QueuedJob(id="long", team="a", kind="training", gpus=8, submit=0.0, walltime_s=10 * HOUR,
                            ran_s=HOUR, preemptions=1))
    assert sched.queued["long"].served
    assert sched.schedule_pass(HOUR + 1).placements == {}
