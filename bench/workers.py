"""Workers benchmark: how fast an idle node starts a job, and whether heartbeats of a large cluster keep up.

    .venv/bin/python bench/workers.py [--jobs 40] [--nodes 500] [--gpus 8] [--interval 10] [--duration 60]

Starts DeepOpt the way a user does (`scripts/run.py`, i.e. `make run`: web server, Celery worker and
beat, and the local node with its agent and worker) on its own database (DATABASE_URL, default
postgres://root@127.0.0.1:5432/deepopt_bench_workers: dropped and created) and its own Redis database,
with DEBUG off, then measures:

  spawn_latency     submit a self-test job to the idle local node, one at a time: the time from the
                    submit request to the runner process's start (the `spawned_at` the worker reports
                    with the runner's pid; one clock, the same host). Goal: p50 < 1 s, p99 < 2 s.
  heartbeat_ingest  register NODES nodes of GPUS GPUs through the API, then send their heartbeats (the
                    agent's body: every GPU's utilization, memory, temperature, power, and the host's)
                    open loop at NODES / INTERVAL per second for DURATION seconds; the achieved rate,
                    the latency measured from each heartbeat's due time (so falling behind shows as
                    lag), and the metric samples stored. Goal: the achieved rate is the offered rate.

Prints one JSON object.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import random
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import requests

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path[:0] = [str(ROOT), str(BENCH_DIR)]

import loadgen  # noqa: E402

DEFAULT_DATABASE_URL = "postgres://root@127.0.0.1:5432/deepopt_bench_workers"
BENCH_REDIS_DB = 11
RATE_TOLERANCE = 0.98


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fresh_database(url: str) -> None:
    if not url.startswith("postgres"):
        return
    import psycopg

    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    admin = parts._replace(path="/postgres").geturl()
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        connection.execute(f'CREATE DATABASE "{name}"')


class Stack:
    """scripts/run.py in a session of its own, its output collected."""

    def __init__(self, env: dict[str, str], port: int, log_path: Path) -> None:
        self.port = port
        self.log = log_path.open("w")
        self.lines: list[str] = []
        self.process = subprocess.Popen([sys.executable, "scripts/run.py", "--port", str(port)], cwd=ROOT, env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        start_new_session=True)
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            self.log.write(line)

    def wait_for(self, pattern: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(re.search(pattern, line) for line in list(self.lines)):
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        raise SystemExit(f"make run did not print {pattern!r}:\n" + "\n".join(self.lines[-40:]))

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def wait_until(check, timeout: float, what: str):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise SystemExit(f"timed out waiting for {what}")


def percentiles(values: list[float]) -> dict:
    ordered = sorted(values)
    return {name: round(loadgen.percentile(ordered, q), 4) for name, q in (("p50", 50), ("p90", 90), ("p99", 99))} | {
        "max": round(ordered[-1], 4), "mean": round(sum(ordered) / len(ordered), 4)}


def spawn_latency(api: requests.Session, base: str, jobs: int) -> dict:
    latencies = []
    for n in range(jobs):
        began = time.time()
        response = api.post(f"{base}/api/v1/jobs/", json={"name": f"spawn {n}", "kind": "selftest",
                                                          "resources": {"gpus": 1},
                                                          "spec": {"steps": 1, "step_seconds": 0.0}})
        response.raise_for_status()
        job = response.json()["id"]

        def spawned(job: int = job) -> float | None:
            events = api.get(f"{base}/api/v1/jobs/{job}/events/", params={"page_size": 200}).json()["results"]
            for event in events:
                if event["kind"] == "progress" and event["data"].get("type") == "spawned":
                    return event["data"]["spawned_at"]
            return None

        spawned_at = wait_until(spawned, 60, f"job {job}'s runner")
        latencies.append(spawned_at - began)
        # The next job must find the node idle again, as the goal says.
        wait_until(lambda job=job: api.get(f"{base}/api/v1/jobs/{job}/").json()["state"] == "succeeded", 60,
                   f"job {job} to finish")
    result = {"jobs": jobs, "seconds": percentiles(latencies), "goal": {"p50_below_s": 1.0, "p99_below_s": 2.0}}
    result["met"] = result["seconds"]["p50"] < 1.0 and result["seconds"]["p99"] < 2.0
    return result


def register_nodes(api: requests.Session, base: str, team: int, count: int, gpus: int) -> list[str]:
    tokens = []
    for n in range(count):
        response = api.post(f"{base}/api/v1/nodes/", json={
            "name": f"bench-{n:04d}", "hostname": f"bench-{n:04d}.example", "team": team, "rack": f"r{n % 16}",
            "gpus": [{"index": g, "model": "NVIDIA H200", "memory_mb": 143_771} for g in range(gpus)]})
        response.raise_for_status()
        tokens.append(response.json()["token"])
    return tokens


def heartbeat_payloads(tokens: list[str], gpus: int, port: int) -> list[bytes]:
    rng = random.Random(0)
    payloads = []
    for token in tokens:
        body = json.dumps({
            "host": {"cpu_percent": round(rng.uniform(5, 95), 1), "memory_used_mb": rng.randint(10_000, 900_000),
                     "memory_total_mb": 1_048_576},
            "gpus": [{"index": g, "utilization": round(rng.uniform(0, 100), 1),
                      "memory_used_mb": rng.randint(0, 143_771), "memory_total_mb": 143_771,
                      "temperature_c": rng.randint(30, 85),
                      "power_w": round(rng.uniform(80, 700), 1)} for g in range(gpus)],
        }).encode()
        payloads.append(loadgen.http_request("POST", "/api/v1/agent/heartbeat/", host="127.0.0.1", port=port, headers={
            "Authorization": f"Node {token}", "Content-Type": "application/json", "Accept": "application/json"},
            body=body))
    return payloads


async def _open_loop_many(port: int, payloads: list[bytes], rate: float, duration: float,
                          drain: float) -> loadgen.Run:
    """loadgen's open loop, each request with the next node's heartbeat (round robin)."""
    loop = asyncio.get_running_loop()
    pool = loadgen._Pool("127.0.0.1", port)  # noqa: SLF001 - the generator's own connection pool
    run = loadgen.Run(mode="open", duration_s=duration)
    for _ in range(8):
        pool.idle.append(await pool.acquire())
    count = int(rate * duration)
    tasks: set[asyncio.Task] = set()
    cpu0, wall0 = time.process_time(), loadgen.now()
    t0 = loadgen.now() + 0.01
    for i in range(count):
        due = t0 + i / rate
        while (delay := due - loadgen.now()) > 0:
            await asyncio.sleep(delay)
        run.send_lag.append(-delay)
        task = loop.create_task(loadgen._timed_request(pool, payloads[i % len(payloads)], due, run, 0))  # noqa: SLF001
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    run.sent = count
    if tasks:
        _, pending = await asyncio.wait(set(tasks), timeout=drain)
        for task in pending:
            task.cancel()
        if pending:
            run.failures["no answer within the drain time"] = len(pending)
    run.wall_s = loadgen.now() - wall0
    run.generator_cpu_s = time.process_time() - cpu0
    run.connections_opened = pool.opened
    pool.close()
    return run


# The fleet's samples only: the local node heartbeats meanwhile too.
COUNT_FLEET_SAMPLES = ("SELECT count(*) FROM cluster_metricsample s JOIN cluster_gpunode n ON n.id = s.node_id "
                       "WHERE n.name LIKE 'bench-0%'")


def count_samples(database_url: str) -> int:
    if database_url.startswith("postgres"):
        import psycopg

        with psycopg.connect(database_url) as connection:
            return connection.execute(COUNT_FLEET_SAMPLES).fetchone()[0]
    import sqlite3

    with sqlite3.connect(urlsplit(database_url).path) as connection:
        return connection.execute(COUNT_FLEET_SAMPLES).fetchone()[0]


def heartbeat_ingest(api: requests.Session, base: str, port: int, database_url: str, nodes: int, gpus: int,
                     interval: float, duration: float) -> dict:
    team = api.post(f"{base}/api/v1/teams/", json={"name": "Bench fleet", "weight": 1, "max_gpus": 8,
                                                   "gpu_hours_per_month": 1000, "max_gpus_per_job": 8}).json()["id"]
    began = time.monotonic()
    tokens = register_nodes(api, base, team, nodes, gpus)
    registered_s = time.monotonic() - began
    payloads = heartbeat_payloads(tokens, gpus, port)
    before = count_samples(database_url)
    rate = nodes / interval
    run = asyncio.run(_open_loop_many(port, payloads, rate, duration, drain=30.0))
    stored = count_samples(database_url) - before
    summary = loadgen.summarize(run, target_rate=rate)
    achieved = summary["achieved_rps"]
    return {
        "nodes": nodes, "gpus_per_node": gpus, "interval_s": interval, "duration_s": duration,
        "registration_s": round(registered_s, 1),
        "offered_heartbeats_per_s": rate, "achieved_heartbeats_per_s": achieved,
        "samples_per_heartbeat": gpus + 1,
        "ingest_samples_per_s": round(stored / run.wall_s, 1) if run.wall_s else None,
        "samples_stored": stored,
        "lag_ms": summary["latency_ms"],  # from each heartbeat's due time: queueing shows here
        "errors": summary["errors"], "errors_detail": summary["errors_detail"],
        "kept_up": achieved >= RATE_TOLERANCE * rate and summary["errors"] == 0
        and stored == (gpus + 1) * summary["responses_2xx"],
        "load": summary,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--nodes", type=int, default=500)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--interval", type=float, default=10.0)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--skip", choices=["spawn", "heartbeats"], action="append", default=[])
    args = parser.parse_args()

    database_url = os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL
    fresh_database(database_url)
    redis = urlsplit(os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0")
    password = secrets.token_urlsafe(16)
    port = free_port()
    work = Path(tempfile.mkdtemp(prefix="deepopt-bench-workers-"))
    env = {**{k: v for k, v in os.environ.items() if k not in ("DJANGO_SETTINGS_MODULE",)},
           "DATABASE_URL": database_url, "REDIS_URL": redis._replace(path=f"/{BENCH_REDIS_DB}").geturl(),
           "DEEPOPT_ADMIN_PASSWORD": password, "DEBUG": "false", "DEEPOPT_LOCAL_NODE": "bench-local", "SLOTS": "2",
           "MEDIA_ROOT": str(work / "media"), "LOG_LEVEL": "WARNING"}
    if database_url.startswith("postgres"):
        env["DATABASE_POOL"] = "4"  # daphne runs sync views on threads it does not keep
    stack = Stack(env, port, work / "make-run.log")
    base = f"http://127.0.0.1:{port}"
    result: dict = {
        "benchmark": "bench/workers.py", "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "database": database_url.split("://")[0], "server": "make run (scripts/run.py: daphne, DEBUG off)",
        "log": str(work / "make-run.log"),
    }
    try:
        stack.wait_for(r"running at http://")
        api = requests.Session()
        token = api.post(f"{base}/api/v1/auth/token/", json={"username": "admin", "password": password}).json()["token"]
        api.headers["Authorization"] = f"Token {token}"

        def local_node_ready() -> bool:
            nodes = api.get(f"{base}/api/v1/nodes/", params={"name": "bench-local"}).json()["results"]
            return any(n["name"] == "bench-local" and n["last_heartbeat_at"] for n in nodes)

        wait_until(local_node_ready, 120, "the local node's first heartbeat")
        time.sleep(3)  # its worker connects to the broker just after the agent registers
        if "spawn" not in args.skip:
            result["spawn_latency"] = spawn_latency(api, base, args.jobs)
        if "heartbeats" not in args.skip:
            result["heartbeat_ingest"] = heartbeat_ingest(api, base, port, database_url, args.nodes, args.gpus,
                                                          args.interval, args.duration)
    finally:
        stack.stop()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
