"""Time of a Prometheus scrape of /metrics on PostgreSQL; prints one JSON object.

    .venv/bin/python bench/metrics_scrape.py --json [--jobs 1000] [--nodes 100] [--scrapes 20]

Drops and creates a throwaway database (--database-url, BENCH_DATABASE_URL, default
postgres://root@127.0.0.1:5432/deepopt_metrics_bench), migrates it, and seeds 10 teams, N nodes of
8 GPUs in mixed states (90 % active, the rest draining, standby, down), M jobs spread over every
state (those holding GPUs with their live allocations, plus released allocation history), a
36-point forecast of cluster:all:allocated_gpus and a few autoscaler decisions. Scheduling-pass
stats go to REDIS_URL (default redis://127.0.0.1:6379/11); without Redis the scrape still runs and
the JSON says so. Then it times `--scrapes` GET /metrics through Django's test client, in-process,
under the production settings (one warm-up scrape first), and reports p50/p95/max in ms, the
queries per scrape and the size of the exposition. The database is dropped at the end unless --keep.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import secrets
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DEFAULT_DATABASE_URL = "postgres://root@127.0.0.1:5432/deepopt_metrics_bench"


def admin_connect(database_url: str):  # noqa: ANN201 - psycopg.Connection
    import psycopg

    url = urlparse(database_url)
    return psycopg.connect(url._replace(path="/postgres").geturl(), autocommit=True), url.path.lstrip("/")


def recreate_database(database_url: str) -> None:
    conn, name = admin_connect(database_url)
    with conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')


def drop_database(database_url: str) -> None:
    from django.db import connections

    connections.close_all()
    conn, name = admin_connect(database_url)
    with conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def set_up_django(database_url: str) -> None:
    os.environ.update({
        "DATABASE_URL": database_url,
        "DJANGO_SETTINGS_MODULE": "deepopt_web.settings.production",
        "SECRET_KEY": os.environ.get("SECRET_KEY") or secrets.token_urlsafe(50),
        "SECURE_SSL_REDIRECT": "false",
        "ALLOWED_HOSTS": "127.0.0.1",
        "LOG_LEVEL": "WARNING",
        "REDIS_URL": os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/11"),
        "DEEPOPT_METRICS_ALLOW": "127.0.0.1",
        "DEEPOPT_SCHEDULER_TRIGGER": "off",
        "DEEPOPT_DISPATCH": "off",
    })
    import django

    django.setup()


def seed(n_jobs: int, n_nodes: int, seed_value: int = 11) -> dict:
    from django.core.management import call_command
    from django.db import connection

    from apps.accounts.models import Team
    from apps.accounts.services import create_user
    from apps.cluster.models import Gpu, GpuNode, hash_node_token, new_node_token
    from apps.forecasting.models import Forecast, ScalingDecision, Series
    from apps.scheduling.models import Allocation, Job

    rnd = random.Random(seed_value)
    call_command("migrate", verbosity=0)
    teams = Team.objects.bulk_create(
        Team(name=f"Team {i}", slug=f"team-{i}", weight=rnd.choice([1, 2, 4]), max_gpus=rnd.choice([64, 128, 256]),
             max_gpus_per_job=8)
        for i in range(10)
    )
    user = create_user(username="bench", password=secrets.token_urlsafe(16))
    states = (["active"] * 90 + ["draining"] * 5 + ["standby"] * 3 + ["down"] * 2)
    nodes = GpuNode.objects.bulk_create(
        GpuNode(name=f"node-{i:03d}", hostname=f"n{i}.example", team=teams[i % len(teams)], rack=f"rack-{i // 16}",
                state=states[i % len(states)], token_hash=hash_node_token(new_node_token()))
        for i in range(n_nodes)
    )
    gpus = Gpu.objects.bulk_create(
        Gpu(node=node, index=i, model="NVIDIA H200", memory_mb=143_771) for node in nodes for i in range(8)
    )
    now = datetime.now(UTC)
    # A quarter of the jobs hold GPUs, 30 % wait, the rest have ended.
    weights = {"queued": 30, "allocated": 5, "running": 19, "cancelling": 1, "succeeded": 35, "failed": 6,
               "cancelled": 4}
    job_states = rnd.choices(list(weights), weights=list(weights.values()), k=n_jobs)
    jobs = Job.objects.bulk_create(
        Job(team=rnd.choice(teams), submitter=user, name=f"job-{i}", kind=rnd.choice(["compression", "training"]),
            gpus=rnd.choice([1, 1, 1, 2, 4, 8]), state=state, spec={})
        for i, state in enumerate(job_states)
    )
    Job.objects.update(submitted_at=now - timedelta(hours=2))  # auto_now_add ignores the value given
    free = [g for g in gpus if g.node.state in ("active", "draining")]
    rnd.shuffle(free)
    allocations = []
    for job in jobs:
        if job.state in ("allocated", "running", "cancelling") and len(free) >= job.gpus:
            allocations += [Allocation(job=job, attempt=1, gpu=g, node_id=g.node_id) for g in (free.pop()
                                                                                              for _ in range(job.gpus))]
        elif job.state in ("succeeded", "failed", "cancelled"):
            g = rnd.choice(gpus)
            allocations.append(Allocation(job=job, attempt=1, gpu=g, node_id=g.node_id, released_at=now))
    Allocation.objects.bulk_create(allocations, batch_size=2000)
    series = Series.objects.create(key="cluster:all:allocated_gpus", scope="cluster", metric="allocated_gpus")
    origin = now - timedelta(minutes=3)
    Forecast.objects.create(series=series, origin=origin, step_s=600, method="bench", points=[
        [(origin + timedelta(minutes=10 * k)).isoformat(), 300.0 + k, 280.0 + k, 320.0 + k] for k in range(1, 37)])
    ScalingDecision.objects.bulk_create(
        ScalingDecision(action=rnd.choice(["activate", "standby"]), node=rnd.choice(nodes), node_name="n",
                        reason="bench", forecast_peak=1.0, active_capacity=8)
        for _ in range(20)
    )
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE")
    return {"postgresql": connection.cursor().connection.info.server_version, "teams": len(teams),
            "nodes": len(nodes), "gpus": len(gpus), "jobs": len(jobs),
            "allocations_live": sum(1 for a in allocations if a.released_at is None),
            "allocations_released": sum(1 for a in allocations if a.released_at is not None)}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]  # nearest rank


def time_scrapes(n: int) -> dict:
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext
    from prometheus_client.parser import text_string_to_metric_families

    from apps.scheduling import pass_stats

    for ms in (12.0, 35.0, 80.0, 240.0):  # a few passes, so that the histogram is exported too
        pass_stats.record_pass(ms, ms / 2, 1, 10)
    client = Client(HTTP_HOST="127.0.0.1", REMOTE_ADDR="127.0.0.1")
    loadavg = os.getloadavg()
    warm = client.get("/metrics")
    assert warm.status_code == 200, warm.content[:300]
    times = []
    for _ in range(n):
        began = time.perf_counter()
        response = client.get("/metrics")
        times.append((time.perf_counter() - began) * 1000)
        assert response.status_code == 200
    with CaptureQueriesContext(connection) as queries:
        response = client.get("/metrics")
    families = list(text_string_to_metric_families(response.content.decode()))
    samples = {s.name: s.value for f in families for s in f.samples if not s.labels}
    return {
        "scrapes": n,
        "loadavg_before": loadavg,
        "p50_ms": round(percentile(times, 0.50), 2),
        "p95_ms": round(percentile(times, 0.95), 2),
        "max_ms": round(max(times), 2),
        "mean_ms": round(sum(times) / n, 2),
        "queries_per_scrape": len(queries),
        "exposition_bytes": len(response.content),
        "families": len(families),
        "samples": sum(len(f.samples) for f in families),
        "pass_stats_from_redis": samples.get("deepopt_scheduler_stats_up") == 1,
        "check": {k: samples.get(k) for k in ("deepopt_queue_length", "deepopt_queue_gpu_demand",
                                              "deepopt_gpus_total", "deepopt_gpus_allocated", "deepopt_gpus_idle")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", default=os.environ.get("BENCH_DATABASE_URL", DEFAULT_DATABASE_URL))
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--scrapes", type=int, default=20)
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    parser.add_argument("--json", action="store_true", help="print JSON only (the default output is JSON too)")
    args = parser.parse_args()
    if not args.database_url.startswith("postgres"):
        parser.error("--database-url must be a PostgreSQL URL (the database is dropped and re-created)")
    if args.jobs < 1 or args.nodes < 1 or args.scrapes < 1:
        parser.error("--jobs, --nodes and --scrapes must be positive")

    recreate_database(args.database_url)
    set_up_django(args.database_url)
    try:
        began = time.perf_counter()
        seeded = seed(args.jobs, args.nodes)
        seed_s = time.perf_counter() - began
        result = time_scrapes(args.scrapes)
    finally:
        if not args.keep:
            drop_database(args.database_url)
    print(json.dumps({
        "bench": "metrics_scrape",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": {"python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine(),
                 # Others' work on the machine shows up in the times: the load before the scrapes says how much.
                 "loadavg_before": [round(x, 2) for x in result.pop("loadavg_before")]},
        "settings": os.environ["DJANGO_SETTINGS_MODULE"],
        "seeded": seeded,
        "seed_s": round(seed_s, 2),
        **result,
    }, indent=2))


if __name__ == "__main__":
    main()
