"""The node's side without a web app: runner command lines, the runner process (its group, its output),
the self-test computation, and what the agent reports about the host."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from workers import agent
from workers.runner import BadJob, RunnerProcess, build_command, runner_env

ROOT = Path(__file__).resolve().parent.parent.parent


def payload(**overrides) -> dict:
    base = {"job": 12, "attempt": 1, "rank": 0, "world_size": 1, "node": "gpu-one", "kind": "selftest",
            "spec": {"steps": 4, "step_seconds": 0.0}, "gpu_indexes": [2, 5], "device_type": "gpu",
            "topology": {"nodes": [{"name": "gpu-one", "rack": "r1", "gpus": [0, 1]}]},
            "master_addr": "gpu-one.example", "master_port": 29_700, "walltime_minutes": None}
    return {**base, **overrides}


def test_the_runner_sees_only_its_gpus_and_a_cpu_slot_sees_none():
    assert runner_env(payload())["CUDA_VISIBLE_DEVICES"] == "2,5"
    assert runner_env(payload(device_type="cpu", gpu_indexes=[0]))["CUDA_VISIBLE_DEVICES"] == ""
    env = runner_env(payload(rank=1, world_size=2))
    assert (env["DEEPOPT_JOB"], env["DEEPOPT_RANK"], env["DEEPOPT_WORLD_SIZE"]) == ("12", "1", "2")


def test_a_compression_job_becomes_the_compression_runners_command(tmp_path):
    spec = {"model": "digits-cnn", "quantization": {"mode": "preset", "max_quality_drop": 0.5},
            "pruning": {"keep_ratio": 0.7}}
    command = build_command(payload(kind="compression", spec=spec), tmp_path / "out", tmp_path)
    assert command[1:3] == ["-m", "workers.compression"]
    text = " ".join(command)
    for part in ("--model digits-cnn", "--quantize preset", "--keep-ratio 0.7", "--max-quality-drop 0.5",
                 f"--out {tmp_path / 'out' / 'model'}", "--device cuda", "--threads 2", "--json-lines"):
        assert part in text
    assert "--drop-blocks" not in text
    assert "--rounding" not in text  # the runner's default (gptq) applies
    no_budget = {**spec, "quantization": {"mode": "auto"}}
    text = " ".join(build_command(payload(kind="compression", spec=no_budget), tmp_path / "out", tmp_path))
    assert "--max-quality-drop" not in text  # the model's own default applies (digits-cnn: 0.3 points)
    rtn = {**spec, "quantization": {"mode": "auto", "rounding": "rtn"}}
    text = " ".join(build_command(payload(kind="compression", spec=rtn), tmp_path / "out", tmp_path))
    assert "--rounding rtn" in text
    assert "--formats" not in text
    assert "--linear-formats" not in text
    fp8 = {**spec, "quantization": {"mode": "auto", "formats": ["int8", "int4_g64"], "linear_formats": ["fp8_e4m3"]}}
    text = " ".join(build_command(payload(kind="compression", spec=fp8), tmp_path / "out", tmp_path))
    assert "--formats int8,int4_g64" in text
    assert "--linear-formats fp8_e4m3" in text
    assert "--fp8-inputs" not in text  # the runner's default (dynamic) applies
    static = {"model": "bert-base", "quantization": {"mode": "auto", "linear_formats": ["fp8_e4m3"],
                                                     "fp8_inputs": "static"}}
    text = " ".join(build_command(payload(kind="compression", spec=static), tmp_path / "out", tmp_path))
    assert "--fp8-inputs static" in text
    deeper = {"model": "resnet50", "pruning": {"keep_ratio": 0.6, "drop_blocks": 10}}
    text = " ".join(build_command(payload(kind="compression", spec=deeper), tmp_path / "out", tmp_path))
    assert "--keep-ratio 0.6" in text
    assert "--drop-blocks 10" in text


def test_a_single_node_training_job_picks_its_own_port_and_uses_gloo_on_cpu_slots(tmp_path):
    spec = {"model": "digits-mlp", "steps": 40, "batch_size": 16,
            "hcof": {"intra_node": "none", "inter_node": "int4", "critical": "bf16"}}
    command = build_command(payload(kind="training", spec=spec, device_type="cpu"), tmp_path / "out", tmp_path)
    assert command[1:3] == ["-m", "workers.training"]
    assert command[command.index("--hcof") + 1] == "intra_node=none,inter_node=int4,critical=bf16"
    assert json.loads(command[command.index("--topology") + 1])["nodes"][0]["gpus"] == [0, 1]
    assert command[command.index("--backend") + 1] == "gloo"
    assert command[command.index("--checkpoint-every") + 1] == "4"
    assert "--node-rank" not in command
    assert "--master-port" not in command
    assert "--resume" not in command
    assert "--lr" not in command  # the runner's default per model
    assert "--lr-warmup" not in command
    tuned = build_command(payload(kind="training", spec={**spec, "lr": 3e-4, "lr_warmup": 50}, device_type="cpu"),
                          tmp_path / "out", tmp_path)
    assert tuned[tuned.index("--lr") + 1] == "0.0003"
    assert tuned[tuned.index("--lr-warmup") + 1] == "50"


def test_a_multi_node_training_rank_meets_the_others_at_the_dispatchers_address(tmp_path):
    spec = {"model": "digits-mlp", "steps": 10, "batch_size": 16, "hcof": {"inter_node": "int4"}}
    command = build_command(payload(kind="training", spec=spec, rank=1, world_size=2), tmp_path / "out", tmp_path)
    assert command[command.index("--node-rank") + 1] == "1"
    assert command[command.index("--master-addr") + 1] == "gpu-one.example"
    assert command[command.index("--master-port") + 1] == "29700"
    assert "--backend" not in command  # GPUs: the training runner picks NCCL itself


def test_a_retried_training_attempt_resumes_from_the_checkpoints_on_this_node(tmp_path):
    checkpoints = tmp_path / "jobs" / "12" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "rank0.pt").write_bytes(b"x")
    command = build_command(payload(kind="training", attempt=2, spec={"model": "digits-mlp", "steps": 10}),
                            tmp_path / "out", tmp_path)
    assert "--resume" in command


def test_an_unknown_kind_is_refused(tmp_path):
    with pytest.raises(BadJob):
        build_command(payload(kind="mining"), tmp_path / "out", tmp_path)


def test_the_selftest_runner_computes_pi_and_reports_each_step(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "workers.runner", "selftest", "--steps", "8", "--step-seconds", "0",
                           "--out", str(out), "--json"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=True)
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["step"] for line in lines[:-1]] == list(range(1, 9))
    final = lines[-1]
    assert final["type"] == "final"
    assert abs(final["pi"] - math.pi) < 1e-9  # 160,000 midpoint intervals
    assert final["abs_error"] == abs(final["pi"] - math.pi)
    assert json.loads((out / "selftest.json").read_text())["pi"] == final["pi"]


def start_selftest(tmp_path: Path, *args: str) -> RunnerProcess:
    command = [sys.executable, "-m", "workers.runner", "selftest", "--json", *args]
    return RunnerProcess(command, runner_env(payload(device_type="cpu")), cwd=ROOT, log_path=tmp_path / "runner.log")


def test_a_runner_process_collects_progress_and_the_final_result(tmp_path):
    runner = start_selftest(tmp_path, "--steps", "3", "--step-seconds", "0")
    assert runner.finish() == 0
    lines = runner.drain()
    assert [line.get("step") for line in lines] == [1, 2, 3, None]
    assert runner.final_result()["type"] == "final"
    assert "out: {" in (tmp_path / "runner.log").read_text()


def test_a_crashing_runner_leaves_its_last_lines_of_stderr(tmp_path):
    runner = start_selftest(tmp_path, "--steps", "5", "--step-seconds", "0", "--crash-at-step", "2")
    assert runner.finish() == 1
    assert runner.stderr_tail[-1] == "RuntimeError: self-test crash requested at step 2"
    assert runner.final_result()["step"] == 1  # its last JSON line was progress, not a result


def test_a_diverged_loss_and_a_nul_byte_reach_the_report_as_strict_json(tmp_path):
    """Python prints a NaN loss as `NaN`, which strict JSON (the agent API's) refuses, and PostgreSQL holds no
    NUL; a report holding either was refused, so a diverged run's result never arrived."""
    script = ("import json, sys; print(json.dumps({'type': 'step', 'loss': float('nan'), 'note': 'a\\x00b'}));"
              "print(json.dumps({'type': 'final', 'final_loss': float('inf'), 'curve': [1.0, float('-inf')]}));"
              "print('bad\\x00byte', file=sys.stderr)")
    runner = RunnerProcess([sys.executable, "-c", script], dict(os.environ), cwd=tmp_path,
                           log_path=tmp_path / "runner.log")
    assert runner.finish() == 0
    assert runner.drain()[0] == {"type": "step", "loss": None, "note": "a\ufffdb"}
    assert runner.final_result() == {"type": "final", "final_loss": None, "curve": [1.0, None]}
    assert list(runner.stderr_tail) == ["bad\ufffdbyte"]
    json.dumps(runner.final_result(), allow_nan=False)  # what requests sends: it raised before


def test_stopping_a_runner_kills_its_whole_process_group_within_the_grace_period(tmp_path):
    # A runner that ignores SIGTERM and has a child of its own, as the training launcher has.
    script = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
              "print('{\"child\": %d}' % child.pid, flush=True); time.sleep(600)")
    runner = RunnerProcess([sys.executable, "-c", script], dict(os.environ), cwd=tmp_path,
                           log_path=tmp_path / "runner.log")
    deadline = time.monotonic() + 30
    while runner.last_json is None and time.monotonic() < deadline:
        time.sleep(0.05)
    child = runner.last_json["child"]
    assert os.getpgid(runner.pid) == runner.pid != os.getpgid(0)  # a group (session) of its own
    began = time.monotonic()
    runner.stop(grace=1.0)
    assert time.monotonic() - began < 5
    assert runner.finish() == -9
    deadline = time.monotonic() + 5
    while psutil.pid_exists(child) and psutil.Process(child).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the runner's child outlived the stop"
        time.sleep(0.05)


def test_a_host_without_gpus_offers_cpu_slots_sharing_its_memory():
    slots = agent.cpu_slots(3)
    assert [s["index"] for s in slots] == [0, 1, 2]
    total_mb = psutil.virtual_memory().total // 2**20
    assert all(abs(s["memory_mb"] * 3 - total_mb) < 3 for s in slots)
    assert slots[0]["model"].startswith("CPU slot")


def test_the_host_sample_has_cpu_and_memory():
    sample = agent.host_sample()
    assert 0 <= sample["cpu_percent"] <= 100
    assert 0 < sample["memory_used_mb"] <= sample["memory_total_mb"]


def test_the_agent_reads_its_server_and_slots_from_the_environment(monkeypatch):
    monkeypatch.setenv("DEEPOPT_SERVER", "http://deepopt.example:8000")
    monkeypatch.setenv("DEEPOPT_CPU_SLOTS", "5")
    args = agent.parse([])
    assert (args.server, args.cpu_slots, args.device) == ("http://deepopt.example:8000", 5, "auto")
    monkeypatch.delenv("DEEPOPT_SERVER")
    with pytest.raises(SystemExit):
        agent.parse([])


def test_a_compression_runners_output_folder_is_uploaded_file_by_file(tmp_path):
    from workers.tasks import NodeConfig, artifact_files

    out = tmp_path / "out"
    (out / "model").mkdir(parents=True)
    (out / "model" / "model.safetensors").write_bytes(b"weights")
    (out / "model" / "manifest.json").write_text("{}")
    config = NodeConfig(server="http://x", token="t", name="gpu-one", work_dir=tmp_path)
    files = artifact_files(payload(kind="compression"), config, out, tmp_path / "runner.log", "succeeded")
    assert [name for name, _ in files] == ["manifest.json", "model.safetensors"]


def test_a_training_job_uploads_rank_0s_final_weights_not_its_pickled_checkpoint_and_a_failure_its_log(tmp_path):
    from workers.runner import checkpoint_dir
    from workers.tasks import NodeConfig, artifact_files

    config = NodeConfig(server="http://x", token="t", name="gpu-one", work_dir=tmp_path)
    job = payload(kind="training", job_key="12-1700000000")
    root = checkpoint_dir(job, tmp_path)
    (root / "step-00000040").mkdir(parents=True)
    (root / "step-00000040" / "rank0.pt").write_bytes(b"state")
    (root / "latest").write_text("40")
    out = tmp_path / "out"
    out.mkdir()
    assert artifact_files(job, config, out, tmp_path / "runner.log", "succeeded") == []  # no pickle leaves the node
    (root / "step-00000040" / "model.safetensors").write_bytes(b"weights")
    files = artifact_files(job, config, out, tmp_path / "runner.log", "succeeded")
    assert files == [("model-step-00000040.safetensors", root / "step-00000040" / "model.safetensors")]
    (tmp_path / "runner.log").write_text("err: boom\n")
    assert artifact_files(job, config, out, tmp_path / "runner.log", "failed") == [
        ("runner.log", tmp_path / "runner.log")]
