"""The autoscaler: its rule on hand-made clusters, the active switch of the policy core's cluster
state, and the trace replay with the autoscaler in the loop (on tests/fixtures/philly-sample.csv,
rows 45000-45299 of the real Philly trace)."""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apps.forecasting import autoscale_replay
from apps.forecasting.autoscale_replay import (
    PersistenceForecaster,
    ReplayOptions,
    compare,
    node_seconds,
    simulate_autoscaled,
)
from apps.forecasting.autoscaler import AutoscalerConfig, NodeView, Plan, plan
from apps.scheduling.policy import PolicyConfig
from apps.scheduling.policy.cluster import ClusterState, Shape
from apps.scheduling.replay import TraceJob, load_trace, load_weights, simulate

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
CONFIG = AutoscalerConfig()  # up over 80 %, down under 50 % for 30 min, 15 min cooldown, >= 1 node


def cluster(active: int, standby: int = 0, busy: tuple[int, ...] = (), gpus: int = 8) -> list[NodeView]:
    """Nodes n0..; the first `active` are active, then `standby` on standby; `busy` are indexes."""
    return [NodeView(f"n{i}", gpus, "active" if i < active else "standby", i in busy)
            for i in range(active + standby)]


def decide(nodes, peak, now=10_000.0, *, low_since=None, last_change_at=None, config=CONFIG, **extra) -> Plan:
    return plan(nodes, peak, now, low_since=low_since, last_change_at=last_change_at, config=config, **extra)


# -- the rule ------------------------------------------------------------------------------------
def test_over_80_percent_it_brings_back_the_fewest_standby_nodes_that_bring_the_peak_under_the_line():
    nodes = cluster(4, standby=4)  # 32 active GPUs, the line at 25.6
    one = decide(nodes, 30)  # 40 GPUs: line 32 >= 30
    assert (one.action, one.nodes) == ("activate", ["n4"])
    three = decide(nodes, 40)  # 48 GPUs: line 38.4 < 40; 56: 44.8
    assert (three.action, three.nodes) == ("activate", ["n4", "n5", "n6"])
    assert "forecast peak 40 GPUs > 80% of 32 active GPUs" in three.reason
    assert decide(nodes, 25.6).action is None  # on the line is not over it


def test_it_scales_up_at_once_whatever_the_hold_time_and_cooldown():
    nodes = cluster(2, standby=1)
    result = decide(nodes, 15, now=100.0, low_since=50.0, last_change_at=99.0)
    assert result.action == "activate"


def test_over_the_line_with_no_node_on_standby_it_says_so():
    result = decide(cluster(2), 15)
    assert result.action is None
    assert result.reason == "forecast peak 15 GPUs > 80% of 16 active GPUs, but no node is on standby"


def test_under_50_percent_nothing_goes_down_before_the_hold_time():
    nodes = cluster(4)  # 32 GPUs, low under 16
    first = decide(nodes, 5, now=1000.0)
    assert first.action is None
    assert first.low_since == 1000.0
    almost = decide(nodes, 5, now=1000.0 + CONFIG.below_for_s - 1, low_since=first.low_since)
    assert almost.action is None
    assert "of 30 min" in almost.reason
    due = decide(nodes, 5, now=1000.0 + CONFIG.below_for_s, low_since=first.low_since)
    assert (due.action, due.nodes) == ("standby", ["n0"])
    assert due.low_since is None  # the next node waits a whole hold time again


def test_a_peak_back_over_the_low_line_restarts_the_hold_time():
    nodes = cluster(4)
    result = decide(nodes, 16, now=5000.0, low_since=1000.0)  # 16 = 50 % of 32: not under
    assert result.action is None
    assert result.low_since is None


def test_no_node_goes_down_during_the_cooldown():
    result = decide(cluster(4), 5, now=5000.0, low_since=1000.0, last_change_at=5000.0 - CONFIG.cooldown_s + 1)
    assert result.action is None
    assert result.reason == "cooling down after the last change"
    after = decide(cluster(4), 5, now=5000.0, low_since=1000.0, last_change_at=5000.0 - CONFIG.cooldown_s)
    assert after.action == "standby"


def test_it_never_goes_under_the_minimum_of_active_nodes():
    config = AutoscalerConfig(min_active_nodes=2)
    result = decide(cluster(2, standby=3), 0, low_since=0.0, config=config)
    assert result.action is None
    assert result.reason == "at the minimum of 2 active node(s)"
    assert decide(cluster(3, standby=2), 0, low_since=0.0, config=config).action == "standby"


def test_it_never_puts_a_node_with_running_jobs_on_standby():
    busy_but_one = decide(cluster(4, busy=(0, 1, 3)), 2, low_since=0.0)
    assert (busy_but_one.action, busy_but_one.nodes) == ("standby", ["n2"])
    all_busy = decide(cluster(4, busy=(0, 1, 2, 3)), 2, low_since=0.0)
    assert all_busy.action is None
    assert all_busy.reason == "no idle node can go without pushing the forecast over the middle line"


def test_hysteresis_a_node_goes_only_if_the_peak_stays_under_the_middle_line_on_what_is_left():
    # 4 x 8 = 32 GPUs: low under 16; without one node 24 GPUs, whose middle line (65 %) is 15.6.
    under_middle = decide(cluster(4), 15.5, low_since=0.0)
    assert under_middle.action == "standby"
    over_middle = decide(cluster(4), 15.9, low_since=0.0)
    assert over_middle.action is None
    assert over_middle.reason == "no idle node can go without pushing the forecast over the middle line"


def test_the_largest_idle_node_goes_first():
    nodes = [NodeView("small", 4, "active", False), NodeView("big", 8, "active", False),
             NodeView("other", 8, "active", True)]
    assert decide(nodes, 1, low_since=0.0).nodes == ["big"]


def test_a_queued_job_larger_than_the_active_capacity_brings_nodes_back_without_load():
    result = decide(cluster(1, standby=5), 0, min_capacity=32)
    assert (result.action, result.nodes) == ("activate", ["n1", "n2", "n3"])
    assert result.reason == "a queued job needs 32 GPUs, 8 are active; 3 standby nodes back, 32 GPUs"


def test_no_node_goes_down_under_the_queued_floor():
    assert decide(cluster(4), 0, low_since=0.0, min_capacity=32).action is None
    assert decide(cluster(4), 0, low_since=0.0, min_capacity=24).action == "standby"


@pytest.mark.parametrize("kwargs", [
    {"scale_up_at": 0.5, "scale_down_below": 0.5}, {"scale_up_at": 1.2}, {"scale_down_below": 0},
    {"min_active_nodes": -1}, {"cooldown_s": -1}, {"below_for_s": -5},
])
def test_a_config_that_makes_no_sense_is_refused(kwargs):
    with pytest.raises(ValueError, match="must|need"):
        AutoscalerConfig(**kwargs)


# -- the active switch of the cluster state --------------------------------------------------------
def make_state(nodes: int = 3, gpus: int = 4) -> ClusterState:
    state = ClusterState()
    for n in range(nodes):
        state.add_node(n, f"node-{n}", f"r{n % 2}", True, ((n * 100 + i, i, 81920) for i in range(gpus)))
    return state


def check_indexes(state: ClusterState) -> None:
    assert state.total_free == sum(f for f, a in zip(state.free_count, state.active, strict=True) if a)
    for k, bucket in enumerate(state.by_free):
        assert bucket == {n for n in range(len(state.ids)) if state.active[n] and state.free_count[n] == k
                          and n not in state.hidden}


def test_a_node_on_standby_takes_no_new_job_and_takes_them_again_when_back():
    state = make_state()
    state.set_active(1, False)
    check_indexes(state)
    assert state.total_free == 8
    three = Shape(3, 1, None)
    assert state.place(three)[0][0] in {0, 2}
    state.allocate("a", state.place(three), 0.0, 100.0)
    state.allocate("b", state.place(three), 0.0, 100.0)
    assert state.place(three) is None
    assert state.place(Shape(1, 1, None)) is not None
    assert state.earliest(three, 0.0)[1][0][0] in {0, 2}  # reservations skip it too
    assert not state.can_ever(Shape(12, 3, None))
    state.set_active(1, True)
    check_indexes(state)
    assert state.place(three) == [(1, 3)]
    assert state.can_ever(Shape(12, 3, None))


def test_a_draining_node_gives_gpus_back_without_counting_them_free():
    state = make_state()
    state.allocate("a", [(2, 2)], 0.0, 50.0)
    state.set_active(2, False)
    check_indexes(state)
    state.release_job("a")
    check_indexes(state)
    assert state.total_free == 8
    assert state.free_count[2] == 4
    state.set_active(2, True)
    check_indexes(state)
    assert state.total_free == 12


def test_switching_a_node_to_the_state_it_is_in_changes_nothing():
    state = make_state()
    state.set_active(0, True)
    state.set_active(1, False)
    state.set_active(1, False)
    check_indexes(state)
    assert state.total_free == 8


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["toggle", "alloc", "release", "hide"]), st.integers(0, 3),
                          st.integers(1, 4)), max_size=40))
def test_the_free_gpu_indexes_stay_true_whatever_the_order_of_switches_allocations_and_releases(ops):
    state = make_state(4, 4)
    live: list[str] = []
    for i, (op, n, gpus) in enumerate(ops):
        if op == "toggle":
            state.set_active(n, not state.active[n])
        elif op == "alloc":
            where = state.place(Shape(gpus, 1, None))
            if where is not None:
                assert state.active[where[0][0]]
                state.allocate(f"j{i}", where, float(i), float(i + 10))
                live.append(f"j{i}")
        elif op == "release" and live:
            state.release_job(live.pop(n % len(live)))
        elif op == "hide":
            state.hide([n])
            check_indexes(state)
            state.unhide()
        check_indexes(state)
        for size in range(1, 5):  # the readiness heaps name only active nodes with that many GPUs free
            ready = state._earliest_ready(size, 4)
            assert all(state.active[m] and (t > -math.inf or state.free_count[m] >= size) for t, m in ready)
            assert {m for t, m in ready if t == -math.inf} == {
                m for m in range(4) if state.active[m] and state.free_count[m] >= size}


# -- the replay ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sample() -> tuple[list[TraceJob], dict[str, float]]:
    return load_trace(FIXTURES / "philly-sample.csv"), load_weights(FIXTURES / "philly-weights.csv")


def options(mode: str, **extra) -> ReplayOptions:
    return ReplayOptions(mode=mode, forecaster=PersistenceForecaster, **extra)


def test_without_the_autoscaler_the_replay_is_exactly_replay_trace(sample):
    jobs, weights = sample
    run = simulate_autoscaled(jobs, PolicyConfig(), 16, 8, options("off"), weights=weights)
    assert run.starts == simulate(jobs, PolicyConfig(preemption=False), 16, 8, 1, weights)
    assert run.paid == [(jobs[0].submit, 16)]


@pytest.fixture(scope="module")
def compared(sample) -> dict:
    jobs, weights = sample
    return compare(jobs, PolicyConfig(), 16, 8, [
        ("reactive", options("reactive")),
        ("forecast", options("forecast")),
        ("forecast_slow_boot", options("forecast", provisioning_delay_s=600)),
    ], weights=weights)


def test_the_autoscaler_scales_both_ways_and_never_pays_for_more_than_the_baseline(compared):
    base = compared["baseline"]
    for name in ("reactive", "forecast", "forecast_slow_boot"):
        result = compared[name]
        assert result["scale_downs"] > 0
        assert result["scale_ups"] > 0
        for window, hours in result["node_hours"].items():
            assert 0 < hours <= base["node_hours"][window]
            assert result["saved_node_hours"][window] == pytest.approx(base["node_hours"][window] - hours, abs=0.2)
        assert result["node_hours"]["run"] < base["node_hours"]["run"]
        assert set(result["added_wait_s"]) == {"mean_wait_s", "p50_wait_s", "p95_wait_s", "p99_wait_s"}


def test_every_job_still_runs_under_the_autoscaler(sample):
    jobs, weights = sample
    for mode, delay in (("reactive", 0.0), ("forecast", 900.0)):
        run = simulate_autoscaled(jobs, PolicyConfig(), 16, 8, options(mode, provisioning_delay_s=delay),
                                  weights=weights)
        assert not any(math.isnan(s) for s in run.starts)
        assert all(s >= j.submit for s, j in zip(run.starts, jobs, strict=True))


def test_the_projects_forecaster_drives_the_replay_through_its_real_interface(sample):
    # Six hours of the sample with run times cut to an hour: too short for Prophet's daily season, so
    # the forecaster says it forecasts by persistence, and no Prophet fit slows the test down.
    jobs, weights = sample
    jobs = [replace(j, duration=min(j.duration, 3600)) for j in jobs if j.submit < 6 * 3600]
    made = []

    def factory(step):
        made.append(autoscale_replay.default_forecaster(step))
        return made[-1]

    result = compare(jobs, PolicyConfig(), 16, 8, [("forecast", ReplayOptions(forecaster=factory))],
                     weights=weights)["forecast"]
    assert type(made[0]).__name__ == "LoadForecaster"
    assert result["load_signal"]["method"].startswith("persistence")
    assert result["load_signal"]["refits"] >= 1
    assert result["decisions"] > 0
    assert result["node_hours"]["run"] <= compare(jobs, PolicyConfig(), 16, 8, [], weights=weights)[
        "baseline"]["node_hours"]["run"]


def test_the_replay_refuses_a_rule_that_puts_a_busy_node_on_standby(sample, monkeypatch):
    jobs, weights = sample

    def reckless(nodes, peak, now, **_):
        busy = [n.name for n in nodes if n.busy and n.state == "active"]
        return Plan("standby", busy[:1]) if busy else Plan(None)

    monkeypatch.setattr(autoscale_replay, "plan", reckless)
    with pytest.raises(RuntimeError, match="on standby with jobs on it"):
        simulate_autoscaled(jobs, PolicyConfig(), 16, 8, options("reactive"), weights=weights)


def burst_trace(*rows: tuple[float, float, int]) -> list[TraceJob]:
    return [TraceJob(i + 1, submit, duration, gpus, "t") for i, (submit, duration, gpus) in enumerate(rows)]


def test_a_node_coming_back_takes_jobs_only_after_its_provisioning_delay():
    # Two 8-GPU nodes. After an hour of nothing one goes to standby; at 2 h two whole-node jobs come:
    # the first fills the other node (100 % > 80 %), the next decision brings the standby node back.
    jobs = burst_trace((0, 10, 8), (7250, 3600, 8), (7250, 3600, 8))
    for delay in (0.0, 600.0):
        run = simulate_autoscaled(jobs, PolicyConfig(), 2, 8, options("reactive", provisioning_delay_s=delay))
        assert run.scale_downs == 1
        assert run.scale_ups == 1
        assert run.starts[:2] == [0, 7250]
        decision = 7500  # decisions every 5 min from the first submit
        assert run.starts[2] == decision + delay
        assert run.paid[-1] == (decision, 2)  # paid for from the decision, not from when it is ready


def test_a_job_larger_than_what_is_active_brings_nodes_back_on_an_idle_cluster():
    jobs = burst_trace((0, 10, 1), (20_000, 100, 32))
    run = simulate_autoscaled(jobs, PolicyConfig(), 4, 8, options("forecast"))
    assert run.scale_downs == 3  # down to the minimum of one node while nothing runs
    assert run.starts[1] == 20_100  # the next decision after it came
    first, last = jobs[0].submit, run.end
    assert node_seconds(run.paid, first, last) < 4 * (last - first)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="mode must be one of"):
        ReplayOptions(mode="psychic")
    with pytest.raises(ValueError, match="horizon_s >= decision_interval_s"):
        ReplayOptions(decision_interval_s=600, horizon_s=300)
    with pytest.raises(ValueError, match="provisioning_delay_s"):
        ReplayOptions(provisioning_delay_s=-1)
