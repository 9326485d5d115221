"""Server time of the dashboard's pages with 1,000 jobs and 100 nodes (issue: < 300 ms).

Sets up its own PostgreSQL database (DATABASE_URL, default postgres://root@127.0.0.1:5432/deepopt_bench_dash:
dropped, created, migrated) with production settings, seeds 4 teams, 100 nodes of 8 GPUs in 5 racks,
1,000 jobs submitted through the service (a scheduling pass places what fits, some finish), GPU telemetry
for every GPU, four weeks of load history (seed_history) and real forecasts (refresh_forecasts, Prophet
included), then times each page with Django's test client in this process: the time from request to
rendered response, which is the server's time (no network, no browser). Prints one JSON object.

    .venv/bin/python bench/dashboard.py [--repeat 20] [--out bench/results/dashboard-DATE-cpu2.json]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import secrets
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.api import bench_environment, recreate_database, seed_cluster, set_up_django  # noqa: E402

DEFAULT_DATABASE_URL = "postgres://root@127.0.0.1:5432/deepopt_bench_dash"
GOAL_MS = 300.0


def seed(jobs: int, nodes: int) -> dict:
    from django.core.management import call_command
    from django.db.models import Count
    from django.utils import timezone

    from apps.accounts.services import create_user
    from apps.cluster.models import Gpu, MetricSample
    from apps.scheduling.live import run_pass
    from apps.scheduling.models import Job
    from apps.scheduling.services import submit_job, transition

    call_command("migrate", verbosity=0)
    teams, users = seed_cluster(4, nodes, 5, {"max_gpus": 400, "max_gpus_per_job": 16, "gpu_hours_per_month": 10**6})
    member = users[0]  # the member the pages are timed for: team 0 only
    staff = create_user(username="staff", password=secrets.token_urlsafe(16))
    staff.is_staff = True
    staff.save()
    submitters = {team.pk: user for team, user in zip(teams, users, strict=True)}
    kinds = [Job.Kind.COMPRESSION, Job.Kind.TRAINING]
    spec = {Job.Kind.COMPRESSION: {"model": "minilm-l6", "quantization": {"mode": "auto", "max_quality_drop": 0.01}},
            Job.Kind.TRAINING: {"model": "digits-mlp", "steps": 100, "batch_size": 32}}
    for i in range(jobs):
        team = teams[i % 4]
        kind = kinds[i % 2]
        submit_job(submitter=submitters[team.pk], team=team, name=f"job {i}", kind=kind, gpus=1 + (i * 7) % 8,
                   walltime_minutes=30 + i % 90, spec=spec[kind])
    run_pass()
    # A third of what got GPUs has finished: history for the lists, free GPUs for the next pass.
    for job in Job.objects.filter(state=Job.State.ALLOCATED)[::3]:
        transition(job, Job.State.RUNNING)
        transition(job, Job.State.SUCCEEDED)
    run_pass()
    now = timezone.now()
    MetricSample.objects.bulk_create(
        MetricSample(node_id=node_id, gpu_index=index, ts=now, utilization=float((node_id * 13 + index * 7) % 100),
                     memory_used_mb=40_000, memory_total_mb=143_771)
        for node_id, index in Gpu.objects.values_list("node_id", "index"))
    call_command("seed_history", verbosity=0)
    from apps.forecasting.series import rollup_minute
    from apps.forecasting.services import refresh_forecasts

    rollup_minute()
    began = time.perf_counter()
    report = refresh_forecasts()
    return {"member": member, "staff": staff, "forecast_refresh_s": round(time.perf_counter() - began, 2),
            "forecasts": report, "states": dict(Job.objects.values_list("state").annotate(n=Count("id")))}


def time_page(client, path: str, repeat: int) -> dict:  # noqa: ANN001
    client.get(path)  # warm: template loading, first queries
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        response = client.get(path)
        times.append((time.perf_counter() - began) * 1000)
        assert response.status_code == 200, (path, response.status_code)
    times.sort()
    return {"p50_ms": round(statistics.median(times), 1), "p95_ms": round(times[int(0.95 * (len(times) - 1))], 1),
            "max_ms": round(times[-1], 1), "bytes": len(response.content)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--out")
    args = parser.parse_args()
    database_url = os.environ.get("BENCH_DATABASE_URL") or DEFAULT_DATABASE_URL
    env = bench_environment(database_url)
    recreate_database(database_url)
    set_up_django(env)
    began = time.perf_counter()
    ctx = seed(args.jobs, args.nodes)
    seed_s = time.perf_counter() - began

    from django.test import Client

    from apps.scheduling.models import Job

    some_job = Job.objects.filter(team__memberships__user=ctx["member"]).order_by("-pk").first()
    some_node = some_job.team.nodes.first()
    pages = ["/", "/jobs/", "/queue/", "/nodes/", "/forecasts/", f"/jobs/{some_job.pk}/", f"/nodes/{some_node.pk}/",
             "/teams/"]
    results = {}
    for who in ("staff", "member"):
        client = Client(headers={"host": "127.0.0.1"})
        client.force_login(ctx[who])
        results[who] = {page: time_page(client, page, args.repeat) for page in pages}
    worst = max(r["p95_ms"] for by_page in results.values() for r in by_page.values())
    out = {
        "benchmark": "dashboard pages, server time (Django test client in-process, production settings, PostgreSQL)",
        "date": dt.datetime.now(dt.UTC).date().isoformat(), "host": platform.node(), "cpus": os.cpu_count(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "jobs": args.jobs, "nodes": args.nodes, "gpus": args.nodes * 8, "job_states": ctx["states"],
        "seed_s": round(seed_s, 1), "forecast_refresh_s": ctx["forecast_refresh_s"], "forecasts": ctx["forecasts"],
        "repeat": args.repeat, "pages": results,
        "goal": {"p95_ms_below": GOAL_MS, "worst_p95_ms": worst, "met": worst < GOAL_MS},
    }
    text = json.dumps(out, indent=2, default=str)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
