"""Real training processes on gloo: 2 emulated nodes of 2 processes, a killed rank, a resumed attempt."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent.parent
pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _run(*args: str, timeout: float = 100) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          check=False, env=dict(os.environ, OMP_NUM_THREADS="1"))


def _lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_the_hierarchical_exchange_equals_a_plain_all_reduce_and_int4_sends_7x_fewer_bytes_between_nodes():
    proc = _run("workers.training.hcof.selfcheck", "--nodes", "2", "--procs-per-node", "2",
                "--elements", "8192", "--rounds", "20")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    codecs = report["codecs"]
    assert codecs["none"]["rel_error_one_round"] < 1e-6
    assert all(c["replicas_identical"] for c in codecs.values())
    # Error feedback: averaged over rounds, what was delivered approaches the true sum.
    for name in ("int8", "int4"):
        assert codecs[name]["rel_error_mean_of_rounds"] < codecs[name]["rel_error_one_round"] / 4, name
    assert codecs["topk:0.05"]["rel_error_mean_of_rounds"] < 0.8 * codecs["topk:0.05"]["rel_error_one_round"]
    inter = {name: c["bytes_by_level"]["inter_node"] for name, c in codecs.items()}
    assert inter["none"] / inter["int4"] >= 7
    assert inter["none"] / inter["bf16"] == 2
    # The node-local reduce-scatter and all-gather stay at full precision whatever the inter-node codec.
    assert codecs["int4"]["bytes_by_level"]["intra_node"] == codecs["none"]["bytes_by_level"]["intra_node"]
    assert report["sparse_rows"]["max_abs_error"] == 0.0
    assert report["sparse_rows"]["bytes_by_level"]["inter_node"] < report["sparse_rows"]["dense_fp32_allreduce_bytes"]
    # The staged exchange that compressed buckets replay from CUDA graphs computes what the eager one does,
    # on four ranks in two nodes: results, error-feedback residuals and bytes, over five rounds.
    staged = report["staged_exchange"]
    assert staged["levels"] == ["intra_node", "inter_node"]
    assert staged["max_abs_difference"] == 0.0
    assert staged["residuals_identical"] is True
    assert staged["bytes_identical"] is True
    # Across a level left uncompressed the rows go dense: as exact, and more bytes than the row-sparse form.
    assert report["dense_rows"]["max_abs_error"] == 0.0
    assert report["dense_rows"]["bytes_by_level"]["inter_node"] > report["sparse_rows"]["bytes_by_level"]["inter_node"]


def test_digits_learns_with_int4_between_two_nodes_of_two_processes():
    proc = _run("workers.training", "--model", "digits-mlp", "--nodes", "2", "--procs-per-node", "2",
                "--backend", "gloo", "--steps", "40", "--hcof", "intra_node=none,inter_node=int4", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = _lines(proc.stdout)
    steps = [r for r in lines if r["type"] == "step"]
    final = lines[-1]
    assert len(steps) == 40
    assert steps[-1]["steps"] == 40  # the total, for the job page's progress bar
    assert final["type"] == "final"
    assert set(steps[-1]["bytes"]) == {"intra_node", "inter_node", "cross_rack"}
    assert final["final_accuracy"] > 0.8  # 40 steps of 128 images; chance is 0.1
    assert final["replicas_consistent"] is True
    assert final["bytes_by_level"]["inter_node"] * 7 < final["bytes_by_level"]["intra_node"]
    assert 0.0 <= final["overlap_ratio"] <= 1.0
    assert 0.0 < final["comm_share"] < 1.0
    # step_time_s is the median of the timed steps of the slowest rank; the mean is reported beside it.
    timed = sorted(r["step_s"] for r in steps[-final["timed_steps"]:])
    assert 0.5 * timed[0] <= final["step_time_s"] <= 1.5 * timed[-1]  # (rank 0's steps; another rank may set it)
    assert final["step_time_mean_s"] > 0
    assert final["loss_curve"][0][0] == 1
    assert final["loss_curve"][-1][0] == 40
    assert final["loss_curve"][-1][1] == round(steps[-1]["loss"], 4)


def test_one_uncompressed_level_runs_on_ddps_reducer_and_learns_as_the_hierarchy_does():
    proc = _run("workers.training", "--model", "digits-mlp", "--nodes", "2", "--procs-per-node", "1",
                "--backend", "gloo", "--steps", "30", "--hcof", "inter_node=none", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    final = _lines(proc.stdout)[-1]
    assert final["engine"] == "ddp"
    assert final["hcof"]["inter_node"] == "none"
    assert final["replicas_consistent"] is True
    assert final["final_accuracy"] > 0.7
    assert final["bytes_counted"].startswith("modelled")
    compressed = _run("workers.training", "--model", "digits-mlp", "--nodes", "2", "--procs-per-node", "1",
                      "--backend", "gloo", "--steps", "30", "--hcof", "inter_node=int8", "--json")
    assert compressed.returncode == 0, compressed.stderr[-2000:]
    assert _lines(compressed.stdout)[-1]["engine"] == "hcof"


def test_a_requeued_attempt_resumes_from_its_checkpoint(tmp_path):
    common = ["workers.training", "--model", "digits-mlp", "--backend", "gloo", "--checkpoint-dir", str(tmp_path),
              "--checkpoint-every", "2", "--json"]
    first = _run(*common, "--steps", "4")
    assert first.returncode == 0, first.stderr[-2000:]
    assert (tmp_path / "latest").read_text() == "4"
    again = _run(*common, "--steps", "7", "--resume")
    assert again.returncode == 0, again.stderr[-2000:]
    lines = _lines(again.stdout)
    assert lines[0] == {"type": "resumed", "step": 4}
    assert [r["step"] for r in lines if r["type"] == "step"] == [5, 6, 7]
    assert [point[0] for point in lines[-1]["loss_curve"]] == [5, 6, 7]  # numbered as the steps, not from 1
    # The trained weights, as safetensors beside the final checkpoint: the same tensors as its model state.
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "step-00000007" / "model.safetensors")
    state = torch.load(tmp_path / "step-00000007" / "rank0.pt", weights_only=False)["model"]
    assert weights.keys() == state.keys()
    assert all(torch.equal(weights[k], state[k]) for k in state)


def test_the_learning_rate_warms_up_linearly_by_step_number_and_a_resumed_attempt_continues_the_ramp(tmp_path):
    common = ["workers.training", "--model", "digits-mlp", "--backend", "gloo", "--lr", "0.01", "--lr-warmup", "4",
              "--checkpoint-dir", str(tmp_path), "--json"]
    first = _run(*common, "--steps", "2")
    assert first.returncode == 0, first.stderr[-2000:]
    again = _run(*common, "--steps", "6", "--resume")
    assert again.returncode == 0, again.stderr[-2000:]
    lrs = [r["lr"] for out in (first, again) for r in _lines(out.stdout) if r["type"] == "step"]
    assert lrs == pytest.approx([0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01])
    assert _lines(again.stdout)[-1]["lr_warmup"] == 4


def test_a_killed_rank_makes_the_others_exit_and_the_attempt_fail_within_60_seconds():
    launcher = subprocess.Popen(
        [sys.executable, "-m", "workers.training", "--model", "digits-mlp", "--nodes", "2", "--procs-per-node", "1",
         "--backend", "gloo", "--steps", "1000000", "--hcof", "inter_node=int8", "--json"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert launcher.stdout.readline().startswith('{"type": "step"')  # training is under way
        workers = psutil.Process(launcher.pid).children()
        victim = next(p for p in workers if p.environ().get("RANK") == "1")
        killed_at = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL)
        rc = launcher.wait(timeout=60)
        assert time.monotonic() - killed_at < 60
        assert rc != 0
        assert "rank" in launcher.stderr.read()
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in workers)
    finally:
        if launcher.poll() is None:
            launcher.kill()


def test_bad_input_fails_before_any_process_starts_with_status_2():
    started = time.monotonic()
    proc = _run("workers.training", "--model", "digits-mlp", "--nodes", "2", "--procs-per-node", "2",
                "--hcof", "inter_node=topk:1.5", timeout=30)
    assert proc.returncode == 2
    assert proc.stderr == "error: the topk ratio must be in (0, 1], got 1.5\n"
    assert time.monotonic() - started < 30


def test_sigterm_ends_the_attempt_at_a_step_boundary_with_a_checkpoint_the_next_one_resumes_from(tmp_path):
    # As the worker stops a preempted attempt: SIGTERM to the launcher's whole process group.
    common = ["workers.training", "--model", "digits-mlp", "--nodes", "2", "--procs-per-node", "2",
              "--backend", "gloo", "--hcof", "intra_node=none,inter_node=int4", "--checkpoint-dir", str(tmp_path),
              "--checkpoint-every", "100000", "--json"]
    launcher = subprocess.Popen([sys.executable, "-m", *common, "--steps", "100000"], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
    seen = []
    try:
        for line in launcher.stdout:  # rank 0's JSON lines
            if line.startswith("{") and json.loads(line).get("type") == "step":
                seen.append(json.loads(line)["step"])
                if len(seen) == 5:
                    break
        os.killpg(launcher.pid, signal.SIGTERM)
        out, err = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode != 0
    [stopped] = [r for r in _lines(out) if r["type"] == "stopped"]
    step = stopped["step"]
    assert step >= 5  # past every step it had printed: nothing done was lost
    assert (tmp_path / "latest").read_text() == str(step)  # every rank wrote it (checkpoint.save's barrier)
    assert sorted(p.name for p in (tmp_path / f"step-{step:08d}").iterdir()) == [f"rank{r}.pt" for r in range(4)]
    again = _run(*common, "--steps", str(step + 3), "--resume")
    assert again.returncode == 0, again.stderr[-2000:]
    lines = _lines(again.stdout)
    assert lines[0] == {"type": "resumed", "step": step}
    assert [r["step"] for r in lines if r["type"] == "step"] == [step + 1, step + 2, step + 3]
