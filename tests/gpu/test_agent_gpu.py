"""The node's side on real GPUs: NVML inventory and telemetry, and a runner that sees only the GPU it was
allocated (skipped without CUDA). Needs no web app: these are the parts a CPU machine cannot check."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from workers.agent import Nvml
from workers.runner import RunnerProcess, build_command, runner_env

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
ROOT = Path(__file__).resolve().parent.parent.parent


def test_the_agent_finds_every_gpu_with_its_model_memory_and_uuid():
    inventory = Nvml().inventory()
    assert len(inventory) == torch.cuda.device_count()
    assert [gpu["index"] for gpu in inventory] == list(range(len(inventory)))
    for gpu in inventory:
        props = torch.cuda.get_device_properties(gpu["index"])
        assert gpu["model"] == props.name
        assert abs(gpu["memory_mb"] - props.total_memory / 2**20) < 1024  # NVML counts what CUDA reserves too
        assert gpu["uuid"].startswith("GPU-")


def test_gpu_telemetry_has_every_reading():
    samples = Nvml().samples()
    assert len(samples) == torch.cuda.device_count()
    for sample in samples:
        assert 0 <= sample["utilization"] <= 100
        assert 0 < sample["memory_used_mb"] <= sample["memory_total_mb"]
        assert 0 < sample["temperature_c"] < 120
        assert sample["power_w"] > 0


def test_a_runner_sees_only_the_gpu_it_was_allocated(tmp_path):
    inventory = Nvml().inventory()
    last = inventory[-1]
    probe = ("import json, torch; p = torch.cuda.get_device_properties(0); "
             "print(json.dumps({'count': torch.cuda.device_count(), 'uuid': 'GPU-' + str(p.uuid)}))")
    payload = {"job": 1, "attempt": 1, "rank": 0, "world_size": 1, "device_type": "gpu",
               "gpu_indexes": [last["index"]]}
    runner = RunnerProcess([sys.executable, "-c", probe], runner_env(payload), cwd=ROOT,
                           log_path=tmp_path / "runner.log")
    assert runner.finish() == 0, list(runner.stderr_tail)
    seen = runner.final_result()
    assert seen == {"count": 1, "uuid": last["uuid"]}


def test_a_training_attempt_runs_on_its_gpu_with_nccl(tmp_path):
    index = torch.cuda.device_count() - 1
    payload = {"job": 7, "job_key": "7-gpu-test", "attempt": 1, "rank": 0, "world_size": 1, "kind": "training",
               "device_type": "gpu", "gpu_indexes": [index],
               "spec": {"model": "digits-mlp", "steps": 30, "batch_size": 32,
                        "hcof": {"intra_node": "none", "inter_node": "int4", "critical": "none"}},
               "topology": {"nodes": [{"name": "gpu-node", "rack": "r1", "gpus": [0]}]},
               "master_addr": "127.0.0.1", "master_port": 29_555}
    command = build_command(payload, tmp_path / "out", tmp_path)
    runner = RunnerProcess(command, runner_env(payload), cwd=ROOT, log_path=tmp_path / "runner.log")
    assert runner.finish(timeout=60) == 0, "\n".join(runner.stderr_tail)
    steps = [line for line in runner.drain(limit=10_000) if line.get("type") == "step"]
    assert [s["step"] for s in steps] == list(range(1, 31))
    final = runner.final_result()
    assert final["type"] == "final"
    assert final["backend"] == "nccl"
    assert final["device"] == torch.cuda.get_device_name(index)
    assert (tmp_path / "jobs" / "7-gpu-test" / "checkpoints" / "latest").read_text().strip() == "30"
    json.dumps(final)  # what the worker posts as the job's result
