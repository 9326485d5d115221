"""The trace replayer and `manage.py replay_trace`, on a 300-job sample of the real Philly trace.

tests/fixtures/philly-sample.csv is rows 45000-45299 of ../shared/data/traces/philly-2017-sep-oct/jobs.csv
(submit times shifted to start at 0); philly-weights.csv is that directory's weights.csv.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from apps.scheduling.replay import TraceError, load_trace, replay

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
SAMPLE = FIXTURES / "philly-sample.csv"
WEIGHTS = FIXTURES / "philly-weights.csv"
FIELDS = {"jobs", "mean_wait_s", "p50_wait_s", "p95_wait_s", "p99_wait_s", "mean_jct_s", "mean_bounded_slowdown",
          "makespan_s", "utilization", "tenant_slowdown_jain", "per_tenant", "preemptions", "preempted_jobs",
          "rejected_jobs", "wall_s"}


@pytest.fixture(scope="module")
def results() -> dict[str, dict]:
    return {policy: replay(SAMPLE, policy, nodes=8, gpus_per_node=8, weights=WEIGHTS)
            for policy in ("fifo", "firstfit", "wfq")}


def test_the_replay_reports_exactly_the_documented_fields(results):
    for result in results.values():
        assert set(result) == FIELDS
        assert result["jobs"] == 300
        assert set(next(iter(result["per_tenant"].values()))) == {"jobs", "mean_wait_s", "mean_bounded_slowdown",
                                                                 "gpu_seconds"}
        assert sum(t["jobs"] for t in result["per_tenant"].values()) == 300
        assert 0 < result["utilization"] <= 1
        assert 0 < result["tenant_slowdown_jain"] <= 1
        assert result["p50_wait_s"] <= result["p95_wait_s"] <= result["p99_wait_s"]


def test_all_policies_do_the_same_work(results):
    gpu_seconds = {p: sum(t["gpu_seconds"] for t in r["per_tenant"].values()) for p, r in results.items()}
    assert len(set(gpu_seconds.values())) == 1


def test_backfill_beats_strict_fifo_and_wfq_waits_least_on_the_real_sample(results):
    assert results["firstfit"]["mean_wait_s"] < results["fifo"]["mean_wait_s"]
    assert results["wfq"]["mean_wait_s"] < results["firstfit"]["mean_wait_s"]
    assert results["wfq"]["tenant_slowdown_jain"] > results["fifo"]["tenant_slowdown_jain"]


def test_the_command_prints_one_json_object(capsys):
    call_command("replay_trace", str(SAMPLE), "--policy", "wfq", "--nodes", "8", "--gpus-per-node", "8",
                 "--weights", str(WEIGHTS), "--json")
    out = capsys.readouterr().out.strip()
    assert "\n" not in out
    assert set(json.loads(out)) == FIELDS


def test_jobs_larger_than_a_node_run_on_whole_nodes(tmp_path):
    trace = tmp_path / "big.csv"
    trace.write_text("submit_s,duration_s,num_gpus,tenant\n0,100,16,a\n0,100,8,b\n10,50,24,a\n")
    result = replay(trace, "wfq", nodes=3, gpus_per_node=8)
    # 16 GPUs = 2 whole nodes, so the 8-GPU job fits beside it and both start at once; 24 = 3 nodes waits.
    assert result["per_tenant"]["b"]["mean_wait_s"] == 0
    assert result["per_tenant"]["a"]["mean_wait_s"] == pytest.approx(90 / 2)


@pytest.mark.parametrize(("content", "message"), [
    ("submit_s,duration_s,tenant\n0,10,a\n", "row 0 (the header) lacks column num_gpus"),
    ("submit_s,duration_s,num_gpus,tenant\n0,10,1,a\n5,-3,1,b\n", "row 2 (line 3): duration_s is negative (-3)"),
    ("submit_s,duration_s,num_gpus,tenant\n0,10,0,a\n", "row 1 (line 2): num_gpus must be a whole number of at least"),
    ("submit_s,duration_s,num_gpus,tenant\n0,ten,1,a\n", "row 1 (line 2): duration_s 'ten' is not a number"),
    ("submit_s,duration_s,num_gpus,tenant\n0,10,1,\n", "row 1 (line 2): no value for tenant"),
    ("submit_s,duration_s,num_gpus,tenant,priority\n0,10,1,a,asap\n", "priority 'asap' is not one of"),
])
def test_a_bad_trace_is_refused_with_the_row_and_why(tmp_path, content, message):
    trace = tmp_path / "bad.csv"
    trace.write_text(content)
    with pytest.raises(TraceError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_trace(trace)
    with pytest.raises(CommandError) as caught:
        call_command("replay_trace", str(trace), "--nodes", "1", "--gpus-per-node", "8", "--json")
    assert caught.value.returncode == 2


def test_a_job_bigger_than_the_cluster_is_rejected_and_left_out_of_the_numbers(tmp_path):
    trace = tmp_path / "huge.csv"
    trace.write_text("submit_s,duration_s,num_gpus,tenant\n0,10,64,a\n5,20,8,b\n6,30,17,a\n")
    for policy in ("fifo", "firstfit", "wfq"):
        result = replay(trace, policy, nodes=2, gpus_per_node=8)
        assert result["jobs"] == 1
        assert result["rejected_jobs"] == 2
        assert result["rejected"] == {"reason": "asks for more GPUs than the cluster's 16", "rows": [1, 3]}
        assert result["mean_wait_s"] == 0
        assert set(result["per_tenant"]) == {"b"}
    done = subprocess.run(
        [sys.executable, "manage.py", "replay_trace", str(trace), "--nodes", "2", "--gpus-per-node", "8", "--json"],
        cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["rejected_jobs"] == 2
    assert done.stderr.strip().splitlines() == [
        "warning: 2 job(s) rejected, left out of the replay and its numbers: asks for more GPUs than the "
        "cluster's 16 (rows 1, 3)"]
    only_huge = tmp_path / "only-huge.csv"
    only_huge.write_text("submit_s,duration_s,num_gpus,tenant\n0,10,64,a\n")
    with pytest.raises(TraceError, match="every job asks for more GPUs than the cluster's 16"):
        replay(only_huge, "wfq", nodes=2, gpus_per_node=8)


def test_the_command_exits_2_with_one_line_on_a_bad_trace(tmp_path):
    trace = tmp_path / "bad.csv"
    trace.write_text("submit_s,duration_s,num_gpus,tenant\n0,10,1,a\n5,-3,1,b\n")
    done = subprocess.run(
        [sys.executable, "manage.py", "replay_trace", str(trace), "--policy", "fifo", "--nodes", "2",
         "--gpus-per-node", "8", "--json"],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2], timeout=60, check=False,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.strip().count("\n") == 0
    assert "row 2 (line 3): duration_s is negative (-3)" in done.stderr


def test_weights_shift_waits_toward_the_lighter_tenant(tmp_path):
    rows = ["submit_s,duration_s,num_gpus,tenant"] + [f"{i},1000,8,{'a' if i % 2 else 'b'}" for i in range(40)]
    trace = tmp_path / "two.csv"
    trace.write_text("\n".join(rows) + "\n")
    weights = tmp_path / "w.csv"
    weights.write_text("tenant,weight\na,4\n")  # b is missing: it weighs 1
    result = replay(trace, "wfq", nodes=1, gpus_per_node=8, weights=weights)
    assert result["per_tenant"]["a"]["mean_wait_s"] < result["per_tenant"]["b"]["mean_wait_s"]
    assert not math.isnan(result["mean_wait_s"])


def test_the_command_replays_with_or_without_preemption(capsys):
    args = [str(SAMPLE), "--policy", "wfq", "--nodes", "8", "--gpus-per-node", "8", "--weights", str(WEIGHTS), "--json"]
    call_command("replay_trace", *args)
    with_preemption = json.loads(capsys.readouterr().out)
    call_command("replay_trace", *args, "--no-preemption")
    without = json.loads(capsys.readouterr().out)
    assert with_preemption["preemptions"] > 0
    assert without["preemptions"] == without["preempted_jobs"] == 0
    # On this sample (8 nodes, queues of days) preemption cuts the mean wait and evens out the tenants.
    assert with_preemption["mean_wait_s"] < without["mean_wait_s"]
    assert with_preemption["tenant_slowdown_jain"] > without["tenant_slowdown_jain"]
    with pytest.raises(CommandError) as caught:
        call_command("replay_trace", *args, "--restart-s", "-5")
    assert caught.value.returncode == 2
    assert "--restart-s" in str(caught.value)
