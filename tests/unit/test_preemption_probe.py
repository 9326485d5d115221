"""The preemption study's simulator (bench/scheduler_preemption_probe.py) on traces small enough to check by hand."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from scheduler_preemption_probe import Cluster, Sim  # noqa: E402

from apps.scheduling.replay import TraceJob  # noqa: E402


def job(row, submit, duration, gpus, tenant="a"):
    return TraceJob(row=row, submit=float(submit), duration=float(duration), gpus=gpus, tenant=tenant)


class CheckedCluster(Cluster):
    def hold(self, job, where):
        super().hold(job, where)
        assert min(self.free) >= 0, "a node was over-allocated"


@pytest.fixture(autouse=True)
def checked(monkeypatch):
    import scheduler_preemption_probe

    monkeypatch.setattr(scheduler_preemption_probe, "Cluster", CheckedCluster)


# Two 8-GPU nodes, each taken by a 10-hour whole-node job; a 2-minute whole-node job arrives an hour later.
TRACE = [job(0, 0, 36_000, 8), job(1, 0, 36_000, 8), job(2, 3_600, 120, 8, tenant="b")]


def test_without_preemption_the_short_job_waits_for_a_long_one_to_end():
    sim = Sim(TRACE, nodes=2, mode="greedy", threshold=14_400, restart=300)
    result = sim.run()
    assert sim.done_at[2] == 36_000 + 120
    assert result["preemptions"] == 0


def test_las_lets_the_short_job_preempt_a_long_one_that_has_run_past_the_threshold():
    # After an hour each long job has 8 GPU-hours > 4: it may be preempted; the new job has none.
    sim = Sim(TRACE, nodes=2, mode="las", threshold=14_400, restart=300)
    assert isinstance(sim.cluster, CheckedCluster)
    result = sim.run()
    assert result["preemptions"] == 1
    assert sim.done_at[2] == 3_600 + 120  # started at once
    # The preempted job resumed when the short one ended, and paid the restart cost.
    assert sorted(sim.done_at[:2]) == [36_000, 36_000 + 120 + 300]


def test_las_does_not_preempt_jobs_under_the_threshold():
    sim = Sim(TRACE, nodes=2, mode="las", threshold=10 * 36_000 * 8, restart=300)
    assert sim.run()["preemptions"] == 0
    assert sim.done_at[2] == 36_000 + 120


def test_fifo_keeps_arrival_order_and_a_multi_node_job_takes_whole_nodes():
    trace = [job(0, 0, 100, 12), job(1, 1, 10, 2), job(2, 2, 10, 8)]
    sim = Sim(trace, nodes=2, mode="fifo", threshold=0, restart=0)
    sim.run()
    assert sim.done_at[0] == 100
    assert sim.done_at[1] == 110  # the 12-GPU job holds both nodes whole
    assert sim.done_at[2] == 110
