"""The scheduler issue's replay goals, checked across cluster sizes and trace halves; prints one JSON object.

For each case (the whole Philly trace at several cluster sizes, and each half of it by submit order at
80 nodes), replays fifo, firstfit and wfq (the product's defaults, preemption included) with the
trace's weights, and checks the goals against that case's own baselines:

- mean wait <= 0.10 x FIFO's and <= first-fit's;
- p99 wait <= first-fit's;
- tenant_slowdown_jain >= 0.90.

    python bench/scheduler_goals.py [--nodes 64,72,80,90,100] [--halves] [--variants] [--procs 2] \
        [--out bench/results/scheduler-goals-DATE-cpu2.json]

`--variants` adds stand-ins for "other clusters", made from the same jobs (none of them has the
weights file; each at two sizes, where FIFO waits about half a day to a few days):

- `users`: every tenant split at random (seed 1) into 6 users, 66 tenants of equal weight (clusters
  where each user is a tenant);
- `gpus_x2`: every job asks twice the GPUs (1 -> 2, 8 -> 16, 32 -> 64), on twice the nodes (clusters
  of bigger jobs: 78 % of the GPU-seconds in jobs of whole nodes or more, against 61 %);
- `arrivals_x1.25`: every submit time x 0.8 (the same jobs arriving 25 % faster, on a bigger cluster).

Needs ../shared/data/traces/philly-2017-sep-oct (exits 2 saying so when it is missing).
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from apps.scheduling.replay import replay  # noqa: E402

TRACE_DIR = ROOT.parent / "shared" / "data" / "traces" / "philly-2017-sep-oct"
POLICIES = ("fifo", "firstfit", "wfq")
KEEP = ("jobs", "mean_wait_s", "p50_wait_s", "p95_wait_s", "p99_wait_s", "mean_bounded_slowdown", "utilization",
        "tenant_slowdown_jain", "preemptions", "preempted_jobs", "wall_s")


def halves(trace: Path, into: Path) -> dict[str, Path]:
    """The trace's first and second half by submit order, as CSV files under `into`."""
    with trace.open(newline="") as handle:
        reader = csv.DictReader(handle)
        rows = sorted(reader, key=lambda r: float(r["submit_s"]))
        fields = reader.fieldnames
    middle = len(rows) // 2
    out = {}
    for name, part in (("first_half", rows[:middle]), ("second_half", rows[middle:])):
        path = into / f"{name}.csv"
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(part)
        out[name] = path
    return out


VARIANTS = {  # name: (cluster sizes, transform of one row)
    "users": ((80, 72), lambda row, rnd: {**row, "tenant": f"{row['tenant']}-{rnd.randrange(6)}"}),
    "gpus_x2": ((160, 150), lambda row, rnd: {**row, "num_gpus": str(2 * int(row["num_gpus"]))}),
    "arrivals_x1.25": ((104, 96), lambda row, rnd: {**row, "submit_s": str(float(row["submit_s"]) * 0.8)}),
}


def variants(trace: Path, into: Path) -> list[tuple[str, Path, int]]:
    """(case, CSV path, nodes) for each VARIANTS entry and size, written under `into`."""
    import random

    with trace.open(newline="") as handle:
        reader = csv.DictReader(handle)
        rows, fields = list(reader), reader.fieldnames
    cases = []
    for name, (sizes, transform) in VARIANTS.items():
        rnd = random.Random(1)
        path = into / f"{name}.csv"
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(transform(row, rnd) for row in rows)
        cases += [(f"{name}_{n}_nodes", path, n) for n in sizes]
    return cases


def one(args: tuple[str, str, Path, int, Path | None]) -> tuple[str, str, dict]:
    case, policy, trace, nodes, weights = args
    result = replay(trace, policy, nodes=nodes, gpus_per_node=8, weights=weights)
    return case, policy, {k: result[k] for k in KEEP}


def goals(results: dict[str, dict]) -> dict:
    fifo, firstfit, wfq = (results[p] for p in POLICIES)
    checks = {
        "mean_wait_le_0.1x_fifo": wfq["mean_wait_s"] <= 0.1 * fifo["mean_wait_s"],
        "mean_wait_le_firstfit": wfq["mean_wait_s"] <= firstfit["mean_wait_s"],
        "p99_wait_le_firstfit": wfq["p99_wait_s"] <= firstfit["p99_wait_s"],
        "jain_ge_0.90": wfq["tenant_slowdown_jain"] >= 0.90,
    }
    return {"mean_wait_vs_fifo": round(wfq["mean_wait_s"] / max(fifo["mean_wait_s"], 1e-9), 4),
            "fifo_mean_wait_h": round(fifo["mean_wait_s"] / 3600, 2), **checks, "all": all(checks.values())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="64,72,80,90,100", help="cluster sizes for the whole trace")
    parser.add_argument("--halves", action="store_true", help="also each half of the trace at 80 nodes")
    parser.add_argument("--variants", action="store_true", help="also the transformed traces (see above), no weights")
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    trace, weights = TRACE_DIR / "jobs.csv", TRACE_DIR / "weights.csv"
    if not trace.is_file():
        print(f"no trace at {trace} (../shared/data is not beside this checkout)", file=sys.stderr)
        return 2
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cases = [(f"whole_{n}_nodes", trace, n) for n in (int(x) for x in args.nodes.split(","))]
        if args.halves:
            cases += [(f"{name}_80_nodes", path, 80) for name, path in halves(trace, Path(tmp)).items()]
        weighted = {case for case, _, _ in cases}
        if args.variants:
            cases += variants(trace, Path(tmp))
        work = [(case, policy, path, n, weights if case in weighted else None)
                for case, path, n in cases for policy in POLICIES]
        results: dict[str, dict] = {case: {} for case, _, _ in cases}
        with ProcessPoolExecutor(max_workers=max(1, args.procs)) as pool:
            for case, policy, result in pool.map(one, work):
                results[case][policy] = result
                print(case, policy, {k: result[k] for k in ("mean_wait_s", "p99_wait_s", "tenant_slowdown_jain")},
                      file=sys.stderr)
    out = {
        "bench": "scheduler_goals",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}",
        "trace": str(trace),
        "weights": str(weights),
        "gpus_per_node": 8,
        "cases": {case: {**by_policy, "goals": goals(by_policy)} for case, by_policy in results.items()},
        "wall_s": round(time.perf_counter() - began, 1),
    }
    text = json.dumps(out, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
