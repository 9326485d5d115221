"""What a preemption costs a training job: the runner stopped by SIGTERM at a step boundary, then resumed
from its checkpoint; prints one JSON object.

    python bench/restart_cost.py [--models digits-mlp] [--backend gloo|nccl] [--procs 1] \
        [--steps-before 20] [--steps-after 10] [--out F.json]

The scheduler's replay charges every preemption a restart cost (`replay_trace --restart-s`: an assumed
300 s until this bench; now 30 s, twice the largest cost it measured). For each model this runs
`python -m workers.training` the way the worker does for a preemptible job (`--checkpoint-dir`, one node
of `--procs` processes) three times:

1. a fresh start: the time from launch to the end of its first step (`fresh_first_step_s`) and the
   steady step time (`step_s`, median of the steps after the first five);
2. after `--steps-before` steps, SIGTERM to its process group, as the worker sends it: the time from
   the signal to the process's exit (`stop_s`: it finishes its step, agrees with the other ranks,
   writes a checkpoint and exits 143), the step it stopped after and the checkpoint's size;
3. a relaunch with `--resume`: the time from launch to the end of its first step (`resume_first_step_s`)
   and that this step is the one after the checkpoint (nothing lost, nothing repeated).

`restart_cost_s` = stop_s + resume_first_step_s - step_s: the time without progress, counting the rest of
the step under way at the signal as lost (an upper bound). What the scheduler and the worker add
before the relaunch (a pass, the dispatch, the agent's spawn) is measured by bench/workers.py
(`spawn_latency`, p50 well under a second) and not included.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def launch(model: str, args, ckpt: Path, steps: int, resume: bool, stop_after: int | None) -> dict:
    cmd = [sys.executable, "-m", "workers.training", "--model", model, "--nodes", "1",
           "--procs-per-node", str(args.procs), "--backend", args.backend, "--steps", str(steps),
           "--hcof", "off", "--checkpoint-dir", str(ckpt), "--checkpoint-every", "1000000", "--json"]
    if resume:
        cmd.append("--resume")
    began = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            bufsize=1, start_new_session=True)
    out: dict = {"steps": [], "signalled_at": None, "stopped_step": None}
    for line in proc.stdout:
        now = time.perf_counter() - began
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("type") == "step":
            out["steps"].append((record["step"], now, record.get("step_s")))
            if stop_after is not None and out["signalled_at"] is None and len(out["steps"]) >= stop_after:
                os.killpg(proc.pid, signal.SIGTERM)  # what the worker does to preempt
                out["signalled_at"], out["signalled_after_step"] = now, record["step"]
        elif record.get("type") == "stopped":
            out["stopped_step"] = record.get("step")
    proc.wait()
    out["exit_at"] = time.perf_counter() - began
    out["returncode"] = proc.returncode
    if proc.returncode not in (0, 143):
        out["stderr_tail"] = proc.stderr.read()[-2000:]
    return out


def measure(model: str, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        fresh = launch(model, args, Path(tmp) / "fresh", args.steps_after + 10, resume=False, stop_after=None)
        ckpt = Path(tmp) / "ckpt"
        stopped = launch(model, args, ckpt, 10 * args.steps_before, resume=False, stop_after=args.steps_before)
        size = sum(f.stat().st_size for f in ckpt.rglob("*.pt"))
        resumed = launch(model, args, ckpt, (stopped["stopped_step"] or 0) + args.steps_after, resume=True,
                         stop_after=None)
    for name, run in (("fresh", fresh), ("stopped", stopped), ("resumed", resumed)):
        if not run["steps"]:
            return {"error": f"the {name} run printed no step (exit {run['returncode']})",
                    "stderr_tail": run.get("stderr_tail", "")}
    steady = [s for _, _, s in fresh["steps"][5:] if s] or [s for _, _, s in fresh["steps"] if s]
    step_s = statistics.median(steady)
    stop_s = stopped["exit_at"] - stopped["signalled_at"]
    first_resumed = resumed["steps"][0]
    out = {
        "step_s": round(step_s, 4),
        "fresh_first_step_s": round(fresh["steps"][0][1], 2),
        "stop_s": round(stop_s, 2),
        "stop_exit_code": stopped["returncode"],
        "signalled_after_step": stopped.get("signalled_after_step"),
        "stopped_step": stopped["stopped_step"],
        "checkpoint_bytes": size,
        "resume_first_step": first_resumed[0],
        "resume_first_step_s": round(first_resumed[1], 2),
        "resumed_where_it_stopped": first_resumed[0] == (stopped["stopped_step"] or 0) + 1,
        "restart_cost_s": round(stop_s + first_resumed[1] - step_s, 2),
    }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits-mlp")
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    parser.add_argument("--procs", type=int, default=1)
    parser.add_argument("--steps-before", type=int, default=20)
    parser.add_argument("--steps-after", type=int, default=10)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    doc: dict = {"bench": "restart_cost", "date": dt.datetime.now(dt.UTC).date().isoformat(),
                 "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}",
                 "backend": args.backend, "procs": args.procs, "results": {}}
    try:
        import torch

        doc["torch"] = torch.__version__
        if args.backend == "nccl" and torch.cuda.is_available():
            doc["device"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    for model in args.models.split(","):
        began = time.perf_counter()
        doc["results"][model] = {**measure(model, args), "wall_s": round(time.perf_counter() - began, 1)}
        print(model, json.dumps(doc["results"][model]), file=sys.stderr, flush=True)
        if args.out:
            args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
