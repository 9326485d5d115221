"""A job attempt's runner process: its command line (from the job's kind and spec), and the process
itself — in a process group of its own, with CUDA_VISIBLE_DEVICES set to its GPUs, its JSON-lines stdout
collected for the progress relay and the last lines of its stderr kept for the failure report.

`python -m workers.runner selftest …` runs the self-test job (workers/selftest.py).
"""
from __future__ import annotations

import collections
import contextlib
import ctypes
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .jsonsafe import json_safe

STDERR_TAIL_LINES = 30
KILL_GRACE_S = 2.0


class BadJob(ValueError):
    """A payload this worker cannot turn into a command (an unknown kind): the attempt fails."""


def build_command(payload: dict, out_dir: Path, work_dir: Path) -> list[str]:
    """The runner's argv for one rank of an attempt (see DESIGN.md §3 for each runner's command line)."""
    kind, spec = payload["kind"], payload.get("spec") or {}
    python = [sys.executable, "-m"]
    if kind == "selftest":
        command = [*python, "workers.runner", "selftest", "--steps", str(spec.get("steps", 20)),
                   "--step-seconds", str(spec.get("step_seconds", 0.1)), "--out", str(out_dir), "--json"]
        if spec.get("crash_at_step"):
            command += ["--crash-at-step", str(spec["crash_at_step"])]
        return command
    on_gpu = payload.get("device_type") == "gpu" and bool(payload.get("gpu_indexes"))
    slots = max(1, len(payload.get("gpu_indexes") or ()))
    if kind == "compression":
        quantization, pruning = spec.get("quantization") or {}, spec.get("pruning") or {}
        # A team's own weights (spec.weights): the worker has fetched them to weights_path() before this.
        source = (["--upload", str(weights_path(out_dir)), "--arch", str(spec["model"])] if spec.get("weights")
                  else ["--model", str(spec["model"])])
        command = [*python, "workers.compression", *source,
                   "--quantize", str(quantization.get("mode", "auto")),
                   "--keep-ratio", str(pruning.get("keep_ratio", 1.0)),
                   "--out", str(out_dir / "model"), "--device", "cuda" if on_gpu else "cpu",
                   "--threads", str(slots), "--json-lines"]
        if pruning.get("drop_blocks"):
            command += ["--drop-blocks", str(int(pruning["drop_blocks"]))]
        if quantization.get("max_quality_drop") is not None:
            command += ["--max-quality-drop", str(quantization["max_quality_drop"])]
        if quantization.get("rounding") in ("gptq", "rtn"):
            command += ["--rounding", quantization["rounding"]]
        for key, flag in (("formats", "--formats"), ("linear_formats", "--linear-formats")):
            if quantization.get(key):
                command += [flag, ",".join(str(f) for f in quantization[key])]
        if quantization.get("fp8_inputs") in ("dynamic", "static"):
            command += ["--fp8-inputs", quantization["fp8_inputs"]]
        return command
    if kind == "training":
        hcof = spec.get("hcof") or {}
        steps = int(spec.get("steps", 100))
        checkpoints = checkpoint_dir(payload, work_dir)
        levels = [level for level in ("intra_node", "inter_node", "critical") if level in hcof]
        codecs = ",".join(f"{level}={hcof[level]}" for level in levels)
        command = [*python, "workers.training", "--model", str(spec["model"]), "--steps", str(steps),
                   "--batch-size", str(spec.get("batch_size", 32)), "--topology", json.dumps(payload["topology"]),
                   "--hcof", codecs or "off", "--checkpoint-dir", str(checkpoints),
                   "--checkpoint-every", str(max(1, steps // 10)), "--json"]
        for key, flag in (("lr", "--lr"), ("lr_warmup", "--lr-warmup")):
            if spec.get(key) is not None:
                command += [flag, str(spec[key])]
        if payload.get("world_size", 1) > 1:
            # One launch per node, all meeting at the first node's address.
            command += ["--node-rank", str(payload["rank"]), "--master-addr", str(payload["master_addr"]),
                        "--master-port", str(payload["master_port"])]
        if not on_gpu:
            command += ["--backend", "gloo"]
        if checkpoints.is_dir() and any(checkpoints.iterdir()):
            command.append("--resume")  # an earlier attempt of this job ran here: continue where it stopped
        return command
    raise BadJob(f"this worker does not know how to run a {kind!r} job")


def weights_path(out_dir: Path) -> Path:
    """Where a compression attempt's uploaded weights are fetched to: beside its output folder."""
    return out_dir.parent / "weights.safetensors"


def checkpoint_dir(payload: dict, work_dir: Path) -> Path:
    """Where a training job keeps its checkpoints on this node, shared by its attempts (a retry resumes)."""
    return work_dir / "jobs" / str(payload.get("job_key") or payload["job"]) / "checkpoints"


def final_weights(payload: dict, work_dir: Path) -> Path | None:
    """The safetensors weights rank 0 exported beside its newest complete training checkpoint
    (workers/training/checkpoint.py's layout), if any."""
    root = checkpoint_dir(payload, work_dir)
    try:
        step = int((root / "latest").read_text().strip())
    except (OSError, ValueError):
        return None
    path = root / f"step-{step:08d}" / "model.safetensors"
    return path if path.is_file() else None


def runner_env(payload: dict) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    # The runner sees only its GPUs, renumbered from 0; a CPU-slot attempt sees none.
    on_gpu = payload.get("device_type") == "gpu"
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in payload.get("gpu_indexes") or ()) if on_gpu else ""
    env["DEEPOPT_JOB"] = str(payload["job"])
    env["DEEPOPT_ATTEMPT"] = str(payload["attempt"])
    env["DEEPOPT_RANK"] = str(payload.get("rank", 0))
    env["DEEPOPT_WORLD_SIZE"] = str(payload.get("world_size", 1))
    for variable in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(variable, None)  # the training launcher sets these for its own processes
    return env


def _load_prctl():  # noqa: ANN202
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


# Looked up once here: the child between fork and exec must not load libraries (other threads of the
# worker may have held the loader's lock when it forked).
_PRCTL = _load_prctl()
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # Runs in the child before exec, and survives the exec: if the worker is killed outright, the runner
    # must not live on holding GPUs (Linux; elsewhere the reconciler still requeues the attempt).
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL)


class RunnerProcess:
    """The runner subprocess and the threads that read it."""

    def __init__(self, command: list[str], env: dict[str, str], cwd: Path, log_path: Path) -> None:
        self.command = command
        self.lines: queue.Queue[dict] = queue.Queue()
        self.last_json: dict | None = None
        self.result: dict | None = None
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = log_path.open("a", encoding="utf-8", errors="replace")
        self.process = subprocess.Popen(  # noqa: S603 - our own runner modules, argv built above
            command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, errors="replace", bufsize=1, start_new_session=True, preexec_fn=_die_with_parent,
        )
        self.pid = self.process.pid
        self._readers = [threading.Thread(target=self._read_stdout, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for reader in self._readers:
            reader.start()
        self.killed_by_us = False

    def _read_stdout(self) -> None:
        for raw in self.process.stdout:
            line = raw.rstrip("\n")
            self._log("out", line)
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not isinstance(record, dict):
                continue
            record = json_safe(record)
            self.last_json = record
            if record.get("type") in ("final", "result"):
                self.result = record
            self.lines.put(record)

    def _read_stderr(self) -> None:
        for raw in self.process.stderr:
            line = raw.rstrip("\n")
            self.stderr_tail.append(json_safe(line))
            self._log("err", line)

    def _log(self, stream: str, line: str) -> None:
        with contextlib.suppress(ValueError):  # closed after the process ended
            self.log.write(f"{stream}: {line}\n")
            self.log.flush()

    def poll(self) -> int | None:
        return self.process.poll()

    def drain(self, limit: int = 200) -> list[dict]:
        taken: list[dict] = []
        while len(taken) < limit:
            try:
                taken.append(self.lines.get_nowait())
            except queue.Empty:
                break
        return taken

    def stop(self, grace: float = KILL_GRACE_S) -> None:
        """SIGTERM to the whole process group (the runner and anything it started), SIGKILL after `grace`."""
        self.killed_by_us = True
        self._signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        self._signal(signal.SIGKILL)  # also whatever of the group outlived its leader
        self.process.wait()

    def _signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signum)

    def finish(self, timeout: float = 10.0) -> int:
        code = self.process.wait()
        for reader in self._readers:
            reader.join(timeout=timeout)
        self.log.close()
        return code

    def final_result(self) -> dict | None:
        """The runner's result: its last `final`/`result` line, else its last JSON object."""
        return self.result if self.result is not None else self.last_json


def main(argv: list[str]) -> int:
    if argv[:1] == ["selftest"]:
        from .selftest import main as selftest

        return selftest(argv[1:])
    print("usage: python -m workers.runner selftest [--steps N] [--step-seconds S] [--out DIR] [--json]",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
