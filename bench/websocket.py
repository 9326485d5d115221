"""Websocket fan-out benchmark: how long one published event takes to reach every socket of /ws/events/.

    .venv/bin/python bench/websocket.py --json [--clients 500,2000] [--events 10] [--teams 4]
        [--configs pubsub:hub,pubsub:groups,core:hub,core:groups] [--out bench/results/websocket-DATE-cpuN.json]

Starts DeepOpt's real ASGI application under daphne (one process, `deepopt_web.settings.production`,
DEBUG off) on its own PostgreSQL database (DATABASE_URL, default
postgres://root@127.0.0.1:5432/deepopt_ws_bench: dropped and created, migrated, seeded) and its own Redis
database (12) as the channel layer. Then, for each configuration (channel layer: Redis pub/sub or
the core RedisChannelLayer; fan-out: DeepOpt's per-process hub, or every socket in its groups as in
Channels' tutorial; the first is DeepOpt's default) and each client count N:

1. opens N sockets to /ws/events/?token=<key>, one per user, the users spread round-robin over TEAMS
   teams (none is staff), so every socket goes through token authentication and team scoping; the
   clients live in this process, on one asyncio loop, with a minimal RFC 6455 client (no websocket
   package is in requirements.txt; its read path is a few lines, so the clients cost little CPU);
2. publishes EVENTS events, one at a time, with `apps.dashboard.events.publish` (the app's own
   publisher, which encodes once and sends through the channel layer), each carrying the wall-clock
   time just before the publish call:
   - `cluster`: one event to the cluster group, which every socket joined (N deliveries);
   - `teams`: one call that sends an event to every team's group (each socket must get its own
     team's copy, and only that: a copy of another team's is counted as an error);
3. measures each delivery's latency (the client's wall clock when its socket had the frame, minus the
   time in the event: one host, one clock) and waits up to 10 s for every socket before the next event.

Before that it measures what publishing costs the publisher (`publisher` in the JSON): CPU per event from
sync code, through the pipelined background sender and through the layer's asyncio client.

Errors: sockets that failed to open or authenticate, deliveries missing after 10 s, sockets closed
under load, and deliveries to the wrong team. Goals (issue 7): 500 clients p95 < 150 ms; 2,000 clients no
error and p95 < 500 ms. Prints one JSON object (and writes it with --out); exits 1 if a goal of the
first configuration is missed.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as dt
import json
import os
import platform
import secrets
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path[:0] = [str(ROOT)]
from bench.api import recreate_database  # noqa: E402

DEFAULT_DATABASE_URL = "postgres://root@127.0.0.1:5432/deepopt_ws_bench"
BENCH_REDIS_DB = 12
DELIVERY_TIMEOUT_S = 10.0
GOALS = {500: 0.150, 2000: 0.500}
LAYERS = {"pubsub": "channels_redis.pubsub.RedisPubSubChannelLayer", "core": "channels_redis.core.RedisChannelLayer"}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env(database_url: str, redis_url: str, layer: str, fanout: str) -> dict[str, str]:
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "deepopt_web.settings.production",
        "SECRET_KEY": os.environ.get("SECRET_KEY") or secrets.token_urlsafe(50),
        "SECURE_SSL_REDIRECT": "false",
        "ALLOWED_HOSTS": "127.0.0.1,localhost",
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "CHANNEL_LAYER": layer,
        "DEEPOPT_LIVE_FANOUT": fanout,
        "LOG_LEVEL": "WARNING",
        "DEEPOPT_SCHEDULER_TRIGGER": "off",
    }


def seed(clients: int, teams: int) -> list[tuple[str, int]]:
    """`clients` users with API tokens, round-robin over `teams` teams; returns (token, team id) pairs."""
    from django.contrib.auth import get_user_model
    from rest_framework.authtoken.models import Token

    from apps.accounts.models import Membership, Team

    user_model = get_user_model()
    team_rows = [Team.objects.get_or_create(name=f"Bench team {i}", defaults={"weight": 1.0, "max_gpus": 64,
                 "gpu_hours_per_month": 10_000, "max_gpus_per_job": 8})[0] for i in range(teams)]
    have = user_model.objects.filter(username__startswith="wsbench-").count()
    if have < clients:
        users = user_model.objects.bulk_create(
            user_model(username=f"wsbench-{i:05d}", password="!") for i in range(have, clients))  # noqa: S106
        Membership.objects.bulk_create(Membership(user=u, team=team_rows[int(u.username[-5:]) % teams],
                                                  role=Membership.Role.MEMBER) for u in users)
        Token.objects.bulk_create(Token(user=u, key=Token.generate_key()) for u in users)
    rows = (Token.objects.filter(user__username__startswith="wsbench-").order_by("user__username")
            .values_list("key", "user__memberships__team_id")[:clients])
    return list(rows)


class Client(asyncio.Protocol):
    """One websocket: the handshake, then frames as they come (text, ping, close). Enough of RFC 6455 for
    a server that sends unfragmented, unmasked frames, which is what daphne (autobahn) does."""

    def __init__(self, port: int, token: str, team: int, bench: Bench) -> None:
        self.port, self.token, self.team, self.bench = port, token, team, bench
        self.buffer = bytearray()
        self.open = asyncio.get_running_loop().create_future()
        self.hello = asyncio.get_running_loop().create_future()
        self.upgraded = False
        self.closed_code: int | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        key = base64.b64encode(secrets.token_bytes(16)).decode()
        transport.write(
            f"GET /ws/events/?token={self.token} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\nOrigin: http://127.0.0.1:{self.port}\r\n\r\n".encode())

    def data_received(self, data: bytes) -> None:
        now = time.time()
        self.buffer += data
        if not self.upgraded:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(self.buffer[:12])
            del self.buffer[:end + 4]
            if b" 101" not in status:
                self._fail(f"handshake answered {status!r}")
                return
            self.upgraded = True
            self.open.set_result(True)
        buffer = self.buffer
        while len(buffer) >= 2:
            opcode, length, start = buffer[0] & 0x0F, buffer[1] & 0x7F, 2
            if length == 126:
                if len(buffer) < 4:
                    return
                length, start = int.from_bytes(buffer[2:4], "big"), 4
            elif length == 127:
                if len(buffer) < 10:
                    return
                length, start = int.from_bytes(buffer[2:10], "big"), 10
            if len(buffer) < start + length:
                return
            payload = bytes(buffer[start:start + length])
            del buffer[:start + length]
            if opcode == 1:
                if not self.hello.done():
                    self.hello.set_result(json.loads(payload))
                else:
                    self.bench.received.append((now, self, payload))
            elif opcode == 9:
                self._send(0xA, payload)
            elif opcode == 8:
                self.closed_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self._fail(f"closed by the server ({self.closed_code})")

    def _send(self, opcode: int, payload: bytes) -> None:
        mask = secrets.token_bytes(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.transport.write(bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked)

    def _fail(self, why: str) -> None:
        self.bench.closed.append(why)
        for future in (self.open, self.hello):
            if not future.done():
                future.set_exception(ConnectionError(why))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed_code is None and not self.bench.closing:
            self._fail(f"connection lost ({exc})")

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            with contextlib.suppress(Exception):
                self._send(0x8, (1000).to_bytes(2, "big"))
            self.transport.close()


class Bench:
    def __init__(self) -> None:
        self.received: list[tuple[float, Client, bytes]] = []
        self.closed: list[str] = []
        self.closing = False
        self.timeout_s = DELIVERY_TIMEOUT_S


async def open_clients(port: int, accounts: list[tuple[str, int]], bench: Bench) -> tuple[list[Client], list[str]]:
    loop = asyncio.get_running_loop()
    clients, errors = [], []
    semaphore = asyncio.Semaphore(100)  # a burst of 2,000 SYNs at once overflows the listen backlog

    async def one(token: str, team: int) -> None:
        async with semaphore:
            try:
                _, client = await loop.create_connection(lambda: Client(port, token, team, bench), "127.0.0.1", port)
                await asyncio.wait_for(client.open, 30)
                hello = await asyncio.wait_for(client.hello, 30)
                if hello["type"] != "hello" or f"team.{team}" not in hello["data"]["groups"]:
                    raise ConnectionError(f"unexpected greeting {hello}")
                clients.append(client)
            except Exception as exc:  # noqa: BLE001 - counted as an error of the run
                errors.append(f"{type(exc).__name__}: {exc}")

    await asyncio.gather(*(one(token, team) for token, team in accounts))
    return clients, errors


def publish_event(scenario: str, seq: int, team_ids: list[int]) -> None:
    from apps.dashboard import events

    if scenario == "cluster":
        events.publish([events.CLUSTER], "bench.ping", {"seq": seq, "sent": time.time()})
    else:
        # One call per team (the app's publishers send each team its own data), back to back.
        sent = time.time()
        for team in team_ids:
            events.publish([events.team_group(team)], "bench.ping", {"seq": seq, "sent": sent, "team": team})


async def run_events(scenario: str, clients: list[Client], team_ids: list[int], count: int, bench: Bench) -> dict:
    latencies: list[float] = []
    per_event: list[dict] = []
    missing = wrong_team = duplicates = 0
    for seq in range(count):
        bench.received.clear()
        publish_event(scenario, seq, team_ids)
        deadline = time.monotonic() + bench.timeout_s
        while time.monotonic() < deadline:
            if sum(1 for r in bench.received if b'"bench.ping"' in r[2]) >= len(clients):
                break
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)  # late duplicates or wrong-team copies would land now
        got: dict[int, int] = {}
        these = []
        for received_at, client, payload in bench.received:
            message = json.loads(payload)
            if message["type"] != "bench.ping" or message["data"]["seq"] != seq:
                continue
            if scenario == "teams" and message["data"].get("team") != client.team:
                wrong_team += 1
                continue
            got[id(client)] = got.get(id(client), 0) + 1
            these.append(received_at - message["data"]["sent"])
        duplicates += sum(n - 1 for n in got.values())
        missing += len(clients) - len(got)
        latencies += these
        per_event.append({"delivered": len(got), "p95_ms": _pct(these, 95), "max_ms": _pct(these, 100)})
        await asyncio.sleep(0.5)
    return {
        "events": count, "deliveries_expected": count * len(clients), "delivered": len(latencies),
        "missing": missing, "wrong_team": wrong_team, "duplicates": duplicates,
        "latency_ms": {"p50": _pct(latencies, 50), "p95": _pct(latencies, 95), "p99": _pct(latencies, 99),
                       "max": _pct(latencies, 100),
                       "mean": round(statistics.fmean(latencies) * 1000, 1) if latencies else None},
        "p95_ms_per_event": {"min": min(e["p95_ms"] or 0 for e in per_event),
                             "median": statistics.median(e["p95_ms"] or 0 for e in per_event),
                             "max": max(e["p95_ms"] or 0 for e in per_event)},
        "per_event": per_event,
    }


def _pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))
    return round(ordered[index] * 1000, 1)


def publisher_cost(redis_url: str, count: int = 5000) -> dict:
    """CPU per `events.publish` of a small event to one team (two groups with staff's), from sync code as
    the app's publishers run (request threads, Celery): the pipelined sender, and the layer's own asyncio
    client (what every publish cost before the sender pipelined). Nobody listens: the publisher's cost."""
    import resource

    from channels.layers import channel_layers
    from django.conf import settings

    from apps.dashboard import events

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    settings.CHANNEL_LAYERS = {"default": {"BACKEND": LAYERS["pubsub"], "CONFIG": {"hosts": [redis_url]}}}
    channel_layers.backends.clear()
    data = {"id": 1, "team": 1, "name": "quantize minilm", "state": "queued", "priority": "normal", "gpus": 1}
    events.publish(["team.1"], "job.state", data)
    events.flush_pending()
    began, wall = cpu(), time.perf_counter()
    for _ in range(count):
        events.publish(["team.1"], "job.state", data)
    caller_s = time.perf_counter() - wall
    events.flush_pending(60)
    pipelined = {"cpu_us_per_event": round((cpu() - began) / count * 1e6, 1),
                 "caller_us_per_event": round(caller_s / count * 1e6, 1)}

    layer = channel_layers["default"]
    groups = events._scoped(["team.1"])

    async def through_layer() -> None:
        for _ in range(count):
            await events._group_send(layer, groups, {"type": events.LAYER_MESSAGE_TYPE,
                                                     "text": events.encode("job.state", data)})

    began = cpu()
    asyncio.run(through_layer())
    layer_path = {"cpu_us_per_event": round((cpu() - began) / count * 1e6, 1)}
    return {"events": count, "groups_per_event": len(groups), "pipelined_sender": pipelined,
            "layer_asyncio_client": layer_path}


def start_server(env: dict, port: int, log_path: Path) -> subprocess.Popen:
    log = log_path.open("w")
    process = subprocess.Popen([sys.executable, "-m", "daphne", "-v", "0", "-b", "127.0.0.1", "-p", str(port),
                                "deepopt_web.asgi:application"], cwd=ROOT, env=env, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    import socket

    for _ in range(300):
        if process.poll() is not None:
            raise RuntimeError(f"daphne exited with {process.returncode}; see {log_path}")
        with socket.socket() as sock, contextlib.suppress(OSError):
            sock.connect(("127.0.0.1", port))
            return process
        time.sleep(0.1)
    raise RuntimeError("daphne did not listen within 30 s")


def stop_server(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def cpu_seconds(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


async def measure(layer: str, fanout: str, sizes: list[int], accounts: list[tuple[str, int]], team_ids: list[int],
                  env: dict, events_per_run: int, log_dir: Path, timeout_s: float) -> list[dict]:
    from channels.layers import channel_layers
    from django.conf import settings

    from apps.dashboard import events

    # The publisher in this process uses the same layer as the server.
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": LAYERS[layer],
                                           "CONFIG": {"hosts": [env["REDIS_URL"]]}}}
    channel_layers.backends.clear()
    results = []
    for size in sizes:
        port = free_port()
        import redis

        redis.Redis.from_url(env["REDIS_URL"]).flushdb()  # the core layer keeps groups in Redis
        server = start_server(env, port, log_dir / f"daphne-{layer}-{fanout}-{size}.log")
        bench = Bench()
        bench.timeout_s = timeout_s
        clients: list[Client] = []
        try:
            began = time.perf_counter()
            clients, connect_errors = await open_clients(port, accounts[:size], bench)
            connect_s = time.perf_counter() - began
            await asyncio.sleep(1.0)
            events.flush_pending()
            publish_event("cluster", -1, team_ids)  # warm the publisher's connection
            await asyncio.sleep(1.0)
            cpu_before = cpu_seconds(server.pid)
            row = {"layer": layer, "fanout": fanout, "backend": LAYERS[layer], "clients": size,
                   "connected": len(clients),
                   "connect_errors": len(connect_errors), "connect_error_examples": connect_errors[:3],
                   "connect_s": round(connect_s, 2), "scenarios": {}}
            for scenario in ("cluster", "teams"):
                row["scenarios"][scenario] = await run_events(scenario, clients, team_ids, events_per_run, bench)
            row["server_cpu_s"] = round(cpu_seconds(server.pid) - cpu_before, 2)
            row["closed_under_load"] = len(bench.closed)
            row["closed_examples"] = bench.closed[:3]
            errors = len(connect_errors) + len(bench.closed) + sum(
                s["missing"] + s["wrong_team"] + s["duplicates"] for s in row["scenarios"].values())
            row["errors"] = errors
            goal = GOALS.get(size)
            if goal is not None:
                worst_p95 = max(s["latency_ms"]["p95"] or 1e9 for s in row["scenarios"].values())
                row["goal"] = {"p95_ms_below": goal * 1000, "no_errors": size >= 2000,
                               "met": worst_p95 < goal * 1000 and (size < 2000 or errors == 0)
                               and row["connected"] == size}
            results.append(row)
            print(json.dumps({k: row[k] for k in ("layer", "fanout", "clients", "connected", "errors")}
                             | {s: v["latency_ms"] for s, v in row["scenarios"].items()}), file=sys.stderr)
        finally:
            bench.closing = True
            for client in clients:
                client.close()
            stop_server(server)
            await asyncio.sleep(0.5)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="500,2000")
    parser.add_argument("--events", type=int, default=10, help="events per scenario and client count")
    parser.add_argument("--teams", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=DELIVERY_TIMEOUT_S,
                        help="seconds to wait for every socket to get an event; later ones count as missing")
    parser.add_argument("--configs", default="pubsub:hub,pubsub:groups,core:hub,core:groups",
                        help="LAYER:FANOUT pairs; LAYER pubsub|core, FANOUT hub|groups; the first is the default")
    parser.add_argument("--database-url", default=os.environ.get("BENCH_DATABASE_URL", DEFAULT_DATABASE_URL))
    parser.add_argument("--redis-url", default=f"redis://127.0.0.1:6379/{BENCH_REDIS_DB}")
    parser.add_argument("--json", action="store_true", help="print the result as JSON (the default output)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    sizes = sorted(int(n) for n in args.clients.split(","))
    configs = [tuple(item.strip().split(":")) for item in args.configs.split(",")]

    recreate_database(args.database_url)
    env = server_env(args.database_url, args.redis_url, *configs[0])
    os.environ.update({k: env[k] for k in ("DJANGO_SETTINGS_MODULE", "SECRET_KEY", "SECURE_SSL_REDIRECT",
                                           "ALLOWED_HOSTS", "DATABASE_URL", "REDIS_URL", "LOG_LEVEL")})
    subprocess.run([sys.executable, "manage.py", "migrate", "-v", "0"], cwd=ROOT, env=env, check=True)
    import django

    django.setup()
    accounts = seed(max(sizes), args.teams)
    team_ids = sorted({team for _, team in accounts})
    log_dir = ROOT / "var" / "bench-websocket"
    log_dir.mkdir(parents=True, exist_ok=True)

    import psutil

    publisher = publisher_cost(args.redis_url)
    print(json.dumps({"publisher": publisher}), file=sys.stderr)
    results = []
    for layer, fanout in configs:
        results += asyncio.run(measure(layer, fanout, sizes, accounts, team_ids,
                                       {**env, "CHANNEL_LAYER": layer, "DEEPOPT_LIVE_FANOUT": fanout},
                                       args.events, log_dir, args.timeout))
    report = {
        "bench": "websocket",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine(),
                 "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
                 "memory_gb": round(psutil.virtual_memory().total / 2**30, 1)},
        "server": "daphne, 1 process, deepopt_web.asgi:application, settings.production (DEBUG off), PostgreSQL",
        "clients": "this process, one asyncio loop, minimal RFC 6455 client; token auth; users round-robin "
                   f"over {len(team_ids)} teams, none staff",
        "events_per_scenario": args.events,
        "delivery_timeout_s": args.timeout,
        "goals": {"500": "p95 < 150 ms", "2000": "no error and p95 < 500 ms"},
        "publisher": publisher,
        "results": results,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    default_rows = [r for r in results if (r["layer"], r["fanout"]) == configs[0] and "goal" in r]
    return 0 if all(r["goal"]["met"] for r in default_rows) else 1


if __name__ == "__main__":
    sys.exit(main())
