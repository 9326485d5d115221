"""Replay the Philly trace with the autoscaler in the loop: node-hours saved, wait added.

    python bench/autoscale_replay.py --json [--out bench/results/autoscale-replay-DATE-cpuN.json]
        [--nodes 80,64,120:reactive+forecast] [--modes reactive,forecast,upper,boot]
        [--from-day D --days N] [--delay-s 300] [--noise-seeds 2]

Reads ../shared/data/traces/philly-2017-sep-oct/{jobs,weights}.csv (52,849 jobs; exits 0 with a
skip message when it is not there). For each cluster size (8-GPU nodes; 80 is what bench/scheduler.py
replays) it runs, on the same trace and the same WFQ core:
- baseline: every node active all the time;
- reactive: the autoscaler's rule on the allocated GPUs of the moment;
- forecast: the rule on the forecaster's peak over the next 10 minutes (Prophet refit daily of
  virtual time, on the last `--history-days` of 5-minute means);
- forecast_upper_band: the rule on the top of the forecast's 80 % band instead of its central value;
- forecast_boot_<delay>, reactive_boot_<delay>: nodes that take `--delay-s` to come back;
- noise: the baseline again on the trace with every submit moved by less than a second (seeded),
  to show how far waits move from nothing but a different order of near-simultaneous events — the
  scale against which the added waits above are to be read.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402

from apps.forecasting.autoscale_replay import (  # noqa: E402
    ReplayOptions,
    compare,
    default_forecaster,
    simulate_autoscaled,
    wait_stats,
)
from apps.forecasting.autoscaler import AutoscalerConfig  # noqa: E402
from apps.scheduling.policy import PolicyConfig  # noqa: E402
from apps.scheduling.replay import load_trace, load_weights  # noqa: E402

TRACE_DIR = ROOT.parent / "shared" / "data" / "traces" / "philly-2017-sep-oct"
DAY = 86400.0


def jittered(jobs, seed: int):
    rnd = random.Random(seed)
    moved = [replace(j, submit=j.submit + rnd.random()) for j in jobs]
    moved.sort(key=lambda j: j.submit)
    return moved


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the result as one JSON document")
    parser.add_argument("--out", type=Path, help="also write the JSON there")
    parser.add_argument("--trace-dir", type=Path, default=TRACE_DIR)
    parser.add_argument("--nodes", default="80,64,120:reactive+forecast",
                        help="cluster sizes (8-GPU nodes), each optionally with its own modes after a colon")
    parser.add_argument("--from-day", type=float, default=0.0, help="replay only jobs submitted from this day...")
    parser.add_argument("--days", type=float, default=None, help="...for this many days (default: to the end)")
    parser.add_argument("--delay-s", type=float, default=300.0, help="provisioning delay of the boot variant")
    parser.add_argument("--history-days", type=float, default=28.0, help="history given to the forecaster")
    parser.add_argument("--noise-seeds", type=int, default=2)
    parser.add_argument("--modes", default="reactive,forecast,upper,boot")
    args = parser.parse_args()

    trace, weights_file = args.trace_dir / "jobs.csv", args.trace_dir / "weights.csv"
    if not trace.exists():
        print(json.dumps({"skipped": f"{trace} is not there (../shared/data is missing); nothing was replayed"}))
        return 0
    jobs = load_trace(trace)
    weights = load_weights(weights_file) if weights_file.exists() else {}
    start = jobs[0].submit + args.from_day * DAY
    stop = start + args.days * DAY if args.days is not None else float("inf")
    jobs = [j for j in jobs if start <= j.submit < stop]
    config = PolicyConfig()
    interval = 300.0
    history = int(args.history_days * DAY / interval)
    probe = default_forecaster(pd.Timedelta(seconds=interval))

    def variants(modes: list[str]) -> list[tuple[str, ReplayOptions]]:
        out = []
        if "reactive" in modes:
            out.append(("reactive", ReplayOptions(mode="reactive")))
        if "forecast" in modes:
            out.append(("forecast", ReplayOptions(mode="forecast", history_steps=history)))
        if "upper" in modes:
            out.append(("forecast_upper_band", ReplayOptions(mode="forecast", history_steps=history, signal="upper")))
        if "boot" in modes:
            out.append((f"forecast_boot_{int(args.delay_s)}s", ReplayOptions(
                mode="forecast", history_steps=history, provisioning_delay_s=args.delay_s)))
            out.append((f"reactive_boot_{int(args.delay_s)}s", ReplayOptions(
                mode="reactive", provisioning_delay_s=args.delay_s)))
        return out

    result = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_avg_1m": round(os.getloadavg()[0], 2)},
        "trace": str(trace), "jobs": len(jobs),
        "range_days": [args.from_day, None if args.days is None else args.from_day + args.days],
        "forecaster": type(probe).__name__,
        "autoscaler": {"decision_interval_s": interval, "horizon_s": 600.0, **asdict(AutoscalerConfig()),
                       "forecaster_history_days": args.history_days},
        "clusters": {},
    }
    began_all = time.perf_counter()
    for spec in args.nodes.split(","):
        nodes_text, _, own_modes = spec.partition(":")
        nodes = int(nodes_text)
        out = compare(jobs, config, nodes, 8, variants(own_modes.split("+") if own_modes else args.modes.split(",")),
                      weights=weights)
        base_waits = {k: out["baseline"][k] for k in ("mean_wait_s", "p50_wait_s", "p95_wait_s", "p99_wait_s")}
        noise = []
        for seed in range(1, args.noise_seeds + 1):
            moved = jittered(jobs, seed)
            run = simulate_autoscaled(moved, config, nodes, 8, ReplayOptions(mode="off"), weights=weights)
            waits = wait_stats(moved, run.starts)
            noise.append({k: round(waits[k] - base_waits[k], 1) for k in waits})
        out["noise_baseline_with_submits_moved_under_1s"] = noise
        result["clusters"][f"{nodes}x8"] = out
        print(f"{nodes}x8 done after {time.perf_counter() - began_all:.0f} s", file=sys.stderr)
    result["wall_s"] = round(time.perf_counter() - began_all, 1)
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    if args.json:
        print(text)
    else:
        for name, out in result["clusters"].items():
            for variant, r in out.items():
                if isinstance(r, dict) and "saved_pct" in r:
                    print(f"{name} {variant}: saved {r['saved_pct']} %, added wait {r['added_wait_s']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
