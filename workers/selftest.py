"""The self-test job: `python -m workers.runner selftest --steps N [--step-seconds S] [--out DIR] --json`.

A real computation, small enough to finish in seconds on any node: π as the integral of 4/(1+x²) over
[0, 1] by the midpoint rule, one chunk of the interval per step. Each step prints a JSON progress line;
the last line is the result (π, its error, the node's view of its allocation), also written to
DIR/selftest.json as the job's artifact. It checks that a node can run jobs end to end — dispatch,
runner process, progress, result, artifact upload — without the minutes a real model takes.
`--crash-at-step K` raises an error at step K, to check that a failing runner is reported as such.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import time
from pathlib import Path

INTERVALS_PER_STEP = 20_000


def chunk_integral(step: int, steps: int) -> float:
    """The midpoint-rule integral of 4/(1+x²) over the step's share of [0, 1]."""
    n = INTERVALS_PER_STEP
    width = 1.0 / (steps * n)
    start = step * n
    return sum(4.0 / (1.0 + ((start + i + 0.5) * width) ** 2) for i in range(n)) * width


def run(steps: int, step_seconds: float, crash_at: int | None, out: Path | None, emit) -> dict:  # noqa: ANN001
    began = time.monotonic()
    total = 0.0
    for step in range(steps):
        t0 = time.monotonic()
        if crash_at is not None and step + 1 == crash_at:
            raise RuntimeError(f"self-test crash requested at step {crash_at}")
        total += chunk_integral(step, steps)
        # Paced, so that a self-test job can be made to last long enough to cancel or interrupt.
        time.sleep(max(0.0, step_seconds - (time.monotonic() - t0)))
        emit({"type": "step", "step": step + 1, "steps": steps, "estimate": total})
    result = {
        "type": "final", "kind": "selftest", "pi": total, "abs_error": abs(total - math.pi),
        "intervals": steps * INTERVALS_PER_STEP, "steps": steps, "wall_s": round(time.monotonic() - began, 3),
        "host": socket.gethostname(), "pid": os.getpid(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "rank": int(os.environ.get("DEEPOPT_RANK", "0")), "world_size": int(os.environ.get("DEEPOPT_WORLD_SIZE", "1")),
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "selftest.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.runner selftest", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--step-seconds", type=float, default=0.1)
    parser.add_argument("--crash-at-step", type=int)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--json", action="store_true", help="JSON lines (progress, then the result)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")

    def emit(record: dict) -> None:
        if args.json:
            print(json.dumps(record), flush=True)

    result = run(args.steps, args.step_seconds, args.crash_at_step, args.out, emit)
    print(json.dumps(result) if args.json else f"pi = {result['pi']:.12f} (error {result['abs_error']:.2e})",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
