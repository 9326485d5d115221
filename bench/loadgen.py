"""A light HTTP/1.1 load generator for bench/api.py: open loop at a fixed rate, or closed loop.

Open loop: request i is due at t0 + i/rate whether or not earlier ones have answered, and its latency is
measured from that due time, not from when it was actually sent. A server (or this generator) that
falls behind therefore shows up in the latency instead of silently lowering the offered rate
(coordinated omission). Requests go out on idle keep-alive connections; when none is idle a new one
is opened, so a slow server never holds back the schedule.

Written on raw asyncio protocols (uvloop when installed) so that it costs a few tens of microseconds of
CPU per request: the generator shares the machine with the server it measures.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

# The loop's own clock is not used: uvloop's is cached per iteration and has millisecond resolution.
now = time.perf_counter


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one request in flight at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            # A response that ends at EOF (no length, no chunking) is complete when the server closes.
            self.waiter.set_exception(ConnectionError("connection closed before the response ended"))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.waiter is not None and not self.waiter.done():
            parsed = _parse_response(self.buf)
            if parsed is not None:
                status, keep_alive, consumed = parsed
                del self.buf[:consumed]
                self.waiter.set_result((status, keep_alive))

    def request(self, payload: bytes) -> asyncio.Future:
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(payload)
        return self.waiter


def _parse_response(buf: bytearray) -> tuple[int, bool, int] | None:
    """(status, keep-alive, bytes consumed) once a whole response is in `buf`, else None."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buf[:end]).lower()
    status = int(head[9:12])
    keep_alive = b"\r\nconnection: close" not in head and not head.startswith(b"http/1.0")
    body_start = end + 4
    marker = head.find(b"\r\ncontent-length:")
    if marker >= 0:
        line_end = head.find(b"\r\n", marker + 2)
        length = int(head[marker + 17: line_end if line_end >= 0 else len(head)])
        total = body_start + length
        return (status, keep_alive, total) if len(buf) >= total else None
    if b"\r\ntransfer-encoding: chunked" in head:
        pos = body_start
        while True:
            size_end = buf.find(b"\r\n", pos)
            if size_end < 0:
                return None
            size = int(bytes(buf[pos:size_end]).split(b";")[0], 16)
            pos = size_end + 2 + size + 2
            if len(buf) < pos:
                return None
            if size == 0:
                return status, keep_alive, pos
    if status in (204, 304) or 100 <= status < 200:
        return status, keep_alive, body_start
    return None  # a body that ends at EOF: not produced by the servers measured here


class _Pool:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: list[_Connection] = []
        self.opened = 0

    async def acquire(self) -> _Connection:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                return conn
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(_Connection, self.host, self.port)
        self.opened += 1
        return conn

    def release(self, conn: _Connection, keep_alive: bool) -> None:
        if keep_alive and not conn.closed:
            self.idle.append(conn)
        else:
            conn.transport.close()

    def close(self) -> None:
        for conn in self.idle:
            conn.transport.close()
        self.idle.clear()


@dataclass
class Run:
    """What one load run saw. Latencies are in seconds, one per completed request."""

    mode: str
    duration_s: float
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)  # connection errors and timeouts
    sent: int = 0
    send_lag: list[float] = field(default_factory=list)  # open loop: how late each send was
    connections_opened: int = 0
    generator_cpu_s: float = 0.0
    wall_s: float = 0.0


async def _timed_request(pool: _Pool, payload: bytes, start: float, run: Run, timeout: float) -> None:
    conn = None
    try:
        conn = await pool.acquire()
        status, keep_alive = await asyncio.wait_for(conn.request(payload), timeout) if timeout else \
            await conn.request(payload)
    except (TimeoutError, OSError, ConnectionError) as exc:
        key = type(exc).__name__
        run.failures[key] = run.failures.get(key, 0) + 1
        if conn is not None:
            conn.transport.close()
        return
    run.latencies.append(now() - start)
    run.statuses[status] = run.statuses.get(status, 0) + 1
    pool.release(conn, keep_alive)


async def _open_loop(host: str, port: int, payload: bytes, rate: float, duration: float, drain: float,
                     warm_connections: int) -> Run:
    loop = asyncio.get_running_loop()
    pool = _Pool(host, port)
    run = Run(mode="open", duration_s=duration)
    for _ in range(warm_connections):
        pool.idle.append(await pool.acquire())
    count = int(rate * duration)
    tasks: set[asyncio.Task] = set()
    cpu0, wall0 = time.process_time(), now()
    t0 = now() + 0.01
    for i in range(count):
        due = t0 + i / rate
        delay = due - now()
        while delay > 0:
            # The event loop's timers are coarse (1 ms under uvloop) and may wake early: sleep again
            # rather than send before the due time.
            await asyncio.sleep(delay)
            delay = due - now()
        run.send_lag.append(-delay)
        task = loop.create_task(_timed_request(pool, payload, due, run, 0))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    run.sent = count
    if tasks:
        _, pending = await asyncio.wait(set(tasks), timeout=drain)
        for task in pending:
            task.cancel()
        if pending:
            run.failures["no answer within the drain time"] = len(pending)
            await asyncio.gather(*pending, return_exceptions=True)
    run.wall_s = now() - wall0
    run.generator_cpu_s = time.process_time() - cpu0
    run.connections_opened = pool.opened
    pool.close()
    return run


async def _closed_loop(host: str, port: int, payload: bytes, clients: int, duration: float, timeout: float) -> Run:
    pool = _Pool(host, port)
    run = Run(mode="closed", duration_s=duration)
    cpu0, start = time.process_time(), now()
    end = start + duration

    async def client() -> None:
        while (sent_at := now()) < end:
            run.sent += 1
            await _timed_request(pool, payload, sent_at, run, timeout)

    await asyncio.gather(*(client() for _ in range(clients)))
    run.wall_s = now() - start
    run.generator_cpu_s = time.process_time() - cpu0
    run.connections_opened = pool.opened
    pool.close()
    return run


def _run(coro):  # noqa: ANN001, ANN202
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def open_loop(host: str, port: int, payload: bytes, *, rate: float, duration: float, drain: float = 10.0,
              warm_connections: int = 8) -> Run:
    return _run(_open_loop(host, port, payload, rate, duration, drain, warm_connections))


def closed_loop(host: str, port: int, payload: bytes, *, clients: int, duration: float, timeout: float = 10.0) -> Run:
    return _run(_closed_loop(host, port, payload, clients, duration, timeout))


def http_request(method: str, path: str, *, host: str, port: int, headers: dict[str, str] | None = None,
                 body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile: the smallest value that at least q% of the values do not exceed."""
    if not sorted_values:
        return float("nan")
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[int(rank) - 1]


def summarize(run: Run, *, target_rate: float | None = None) -> dict:
    lat = sorted(run.latencies)
    completed = len(lat)
    ok = sum(n for status, n in run.statuses.items() if 200 <= status < 300)
    non_2xx = completed - ok
    failed = sum(run.failures.values())
    out = {
        "generator": "bench/loadgen.py (asyncio, " + ("open loop" if run.mode == "open" else "closed loop") + ")",
        "requests_sent": run.sent,
        "responses": completed,
        "responses_2xx": ok,
        # Achieved rate: answered requests over the time the scenario took, including the time taken
        # to answer the last of them, so a server that falls behind shows a rate below the target.
        "achieved_rps": round(ok / run.wall_s, 1) if run.wall_s else 0.0,
        "errors": non_2xx + failed,
        "errors_detail": {**{f"HTTP {s}": n for s, n in sorted(run.statuses.items()) if not 200 <= s < 300},
                          **run.failures},
        "latency_ms": {name: round(percentile(lat, q) * 1000, 2) if lat else None
                       for name, q in (("p50", 50), ("p90", 90), ("p99", 99), ("p99.9", 99.9))},
        "wall_s": round(run.wall_s, 2),
        "connections_opened": run.connections_opened,
        "generator_cpu_s": round(run.generator_cpu_s, 2),
    }
    out["latency_ms"]["max"] = round(lat[-1] * 1000, 2) if lat else None
    out["latency_ms"]["mean"] = round(sum(lat) / completed * 1000, 2) if lat else None
    if run.mode == "open":
        lag = sorted(run.send_lag)
        out["target_rps"] = target_rate
        out["send_lag_ms"] = {"p99": round(percentile(lag, 99) * 1000, 3), "max": round(lag[-1] * 1000, 3)}
    return out


_ECHO_SERVER = """
import asyncio, sys
DELAY = float(sys.argv[1])
async def handle(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\\r\\n\\r\\n")
            for line in head.split(b"\\r\\n"):
                if line.lower().startswith(b"content-length:") and int(line.split(b":")[1]):
                    await reader.readexactly(int(line.split(b":")[1]))
            if DELAY:
                await asyncio.sleep(DELAY)
            writer.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\n{}")
    except (ConnectionError, asyncio.IncompleteReadError):
        writer.close()
async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()
asyncio.run(main())
"""


def self_check(duration: float = 5.0) -> dict:
    """Measure the generator against a server (another process) that answers at once, and one that
    waits 20 ms. A trustworthy open-loop generator reports sub-millisecond latency against the first
    and just over 20 ms against the second, at the rate it was asked for, with no errors.
    """
    import subprocess
    import sys

    results = {}
    for delay in (0.0, 0.02):
        server = subprocess.Popen([sys.executable, "-c", _ECHO_SERVER, str(delay)], stdout=subprocess.PIPE, text=True)
        try:
            port = int(server.stdout.readline())
            payload = http_request("GET", "/", host="127.0.0.1", port=port)
            for rate in (200, 1000):
                run = open_loop("127.0.0.1", port, payload, rate=rate, duration=duration)
                results[f"server_delay_{int(delay * 1000)}ms_rate_{rate}"] = summarize(run, target_rate=rate)
        finally:
            server.terminate()
            server.wait(5)
    return results
