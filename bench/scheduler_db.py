"""The live scheduling pass on PostgreSQL with 10,000 queued jobs on 128 nodes × 8 GPUs (issue: ≤ 1 s).

Sets up its own database (BENCH_DATABASE_URL, default postgres://root@127.0.0.1:5432/deepopt_bench_sched:
dropped, created, migrated) under the production settings, registers 128 nodes of 8 GPUs in 8 racks and
4 teams, submits the jobs through `submit_job` (1 to 8 GPUs, a few multi-node ones, spread over teams,
kinds and priorities), then times `apps.scheduling.live.run_pass()` — snapshot from the database, the
policy core, allocations written `select_for_update`, queue entries and ETAs written — as a user's
submit would trigger it:

- `first`: the pass that finds the whole queue new and fills the cluster (writes ~1,000 allocations);
- `steady`: passes over the same full cluster and queue (nothing fits), as they run in production: the
  ETAs of the first 1,000 queued jobs are recomputed at most every DEEPOPT_ETA_REFRESH_S (15 s);
- `steady_with_etas`: the same with the ETAs recomputed by every pass;
- `after_end`: a pass right after a tenth of the running jobs ended (some of the queue starts);
- `preempting`: a pass once the running jobs have run two hours (those of 2 or more GPUs are then past
  the 4 GPU-hour preemption mark): it moves the jobs it preempts to `preempting`, one transition each.

Prints one JSON object (`db_pass_ms` = the steady p50 of `pass_ms`, the time to the commit of the
pass's allocations and queue rows; `ms` is the whole of run_pass, with the ETA forecast that follows the
commit when due; each pass also reports its time in the policy and in the ETAs).

    .venv/bin/python bench/scheduler_db.py [--jobs 10000] [--out bench/results/scheduler-db-DATE-cpu2.json]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.api import bench_environment, recreate_database, seed_cluster, set_up_django  # noqa: E402

DEFAULT_DATABASE_URL = "postgres://root@127.0.0.1:5432/deepopt_bench_sched"
GOAL_MS = 1000.0


def seed(jobs: int, nodes: int) -> None:
    from django.core.management import call_command

    from apps.scheduling.models import Job
    from apps.scheduling.services import submit_job

    call_command("migrate", verbosity=0)
    teams, users = seed_cluster(4, nodes, 8, {"weight": lambda i: 1 + i, "max_gpus": 10**6, "max_gpus_per_job": 64,
                                              "gpu_hours_per_month": 10**9})
    priorities = [Job.Priority.NORMAL] * 6 + [Job.Priority.LOW, Job.Priority.HIGH]
    for i in range(jobs):
        team = i % 4
        multi = i % 50 == 0
        kind = Job.Kind.TRAINING if multi or i % 2 else Job.Kind.COMPRESSION
        spec = ({"model": "digits-mlp", "steps": 100, "batch_size": 32} if kind == Job.Kind.TRAINING
                else {"model": "minilm-l6"})
        submit_job(submitter=users[team], team=teams[team], name=f"job {i}", kind=kind,
                   priority=priorities[i % len(priorities)], gpus=16 if multi else 1 + (i * 7) % 8,
                   nodes=2 if multi else 1, walltime_minutes=30 + (i * 13) % 600, spec=spec)


def timed_pass(with_etas: bool | None = None) -> dict:
    from apps.scheduling.live import run_pass

    began = time.perf_counter()
    result = run_pass(with_etas=with_etas)
    return {"ms": round((time.perf_counter() - began) * 1000, 1), "pass_ms": round(result.pass_ms, 1),
            "policy_ms": round(result.policy_ms, 1), "eta_ms": round(result.eta_ms, 1) if result.eta_ms else None,
            "placed": len(result.placed), "queued": result.queued, "etas": result.etas,
            "preempted": len(result.preempted)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--nodes", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out")
    args = parser.parse_args()
    database_url = os.environ.get("BENCH_DATABASE_URL") or DEFAULT_DATABASE_URL
    env = bench_environment(database_url)
    env["DEEPOPT_SCHEDULER_TRIGGER"] = "off"  # the bench runs the passes itself
    env["DEEPOPT_DISPATCH"] = "off"  # there are no real nodes to send attempts to
    os.environ.update({k: env[k] for k in ("DEEPOPT_SCHEDULER_TRIGGER", "DEEPOPT_DISPATCH")})
    recreate_database(database_url)
    set_up_django(env)
    from django.conf import settings
    from django.db import connection

    from apps.scheduling.models import Job
    from apps.scheduling.services import transition

    began = time.perf_counter()
    seed(args.jobs, args.nodes)
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE")
    seed_s = time.perf_counter() - began

    first = timed_pass()
    steady = [timed_pass() for _ in range(args.repeat)]
    steady_with_etas = [timed_pass(with_etas=True) for _ in range(args.repeat)]
    running = list(Job.objects.filter(state=Job.State.ALLOCATED).order_by("pk"))
    for job in running[:: 10]:
        transition(job, Job.State.RUNNING)
        transition(job, Job.State.SUCCEEDED)
    after_end = timed_pass()
    # Two hours on: the bench's shortcut to running jobs with that much service (no worker reports here).
    Job.objects.filter(state=Job.State.ALLOCATED).update(
        state=Job.State.RUNNING, started_at=dt.datetime.now(dt.UTC) - dt.timedelta(hours=2))
    preempting = timed_pass()
    steady_ms = sorted(p["pass_ms"] for p in steady)
    db_pass_ms = statistics.median(steady_ms)
    committed = max(db_pass_ms, first["pass_ms"], after_end["pass_ms"], preempting["pass_ms"])
    with_etas = max(statistics.median(p["ms"] for p in steady), first["ms"], after_end["ms"],
                    statistics.median(p["ms"] for p in steady_with_etas))
    out = {
        "benchmark": "live scheduling pass on PostgreSQL (apps.scheduling.live.run_pass)",
        "date": dt.datetime.now(dt.UTC).date().isoformat(), "host": platform.node(), "cpus": os.cpu_count(),
        "load_avg": [round(x, 2) for x in os.getloadavg()], "settings": "production",
        "jobs": args.jobs, "nodes": args.nodes, "gpus": args.nodes * 8, "seed_s": round(seed_s, 1),
        "first": first, "steady": steady, "steady_with_etas": steady_with_etas, "after_end": after_end,
        "preempting": preempting,
        "ended_jobs": len(running[::10]), "db_pass_ms": db_pass_ms,
        "db_pass_with_etas_ms": statistics.median(p["ms"] for p in steady_with_etas),
        "eta_refresh_s": settings.DEEPOPT_ETA_REFRESH_S,
        "goal": {"db_pass_ms_at_most": GOAL_MS, "met": committed <= GOAL_MS,
                 "worst_pass_ms": committed, "met_including_etas": with_etas <= GOAL_MS,
                 "worst_ms_including_etas": with_etas,
                 "note": "pass_ms: from the start of run_pass to the commit of its allocations and queue rows; "
                         "ms: run_pass as a whole, with the ETA forecast and its write that follow the commit "
                         "when due. Met only if the first, steady (p50), after-end and preempting passes are "
                         "all within the goal."},
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
