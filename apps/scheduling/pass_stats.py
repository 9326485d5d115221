"""Scheduling-pass timings, kept in Redis for the /metrics endpoint.

Passes run in Celery worker processes, while Prometheus scrapes the web process, so an in-process
prometheus_client histogram in the worker would never be seen. Each pass adds itself to one Redis
hash instead: the last pass's values, and a histogram (count, sum, one counter per bucket) that the
web process turns into `deepopt_scheduler_pass_seconds` at scrape time. Counters in Redis restart
from zero with Redis, which Prometheus reads as an ordinary counter reset.

Redis is only a messenger here: when it does not answer, the pass goes on, a warning is logged, and
for BACKOFF_S no further attempt is made, so a dead Redis costs a pass nothing but a dict lookup.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from django.conf import settings

log = logging.getLogger(__name__)

KEY = "deepopt:scheduler:pass-stats"
# Seconds. A pass over a small cluster takes milliseconds; 10,000 queued jobs take about a second.
BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BACKOFF_S = 30.0
TIMEOUT_S = 0.5

_clients: dict[str, object] = {}
_down_until: dict[str, float] = {}


def _bucket_field(le: float) -> str:
    return f"bucket:{le:g}"


def _client(url: str):  # noqa: ANN202 - redis.Redis, imported lazily
    client = _clients.get(url)
    if client is None:
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=TIMEOUT_S, socket_timeout=TIMEOUT_S)
        _clients[url] = client
    return client


def _available(url: str) -> bool:
    return time.monotonic() >= _down_until.get(url, 0.0)


def _failed(url: str, what: str) -> None:
    _down_until[url] = time.monotonic() + BACKOFF_S
    log.warning("Could not %s scheduling-pass stats in Redis (%s); retrying in %.0f s.",
                what, url.rsplit("@", 1)[-1], BACKOFF_S, exc_info=True)


def record_pass(pass_ms: float, policy_ms: float, placed: int, queued: int) -> None:
    """Add one pass to the stats. Never raises: a pass must not fail because Redis is away."""
    if not getattr(settings, "DEEPOPT_PASS_STATS", True):
        return
    url = settings.REDIS_URL
    if not _available(url):
        return
    seconds = pass_ms / 1000.0
    try:
        pipe = _client(url).pipeline(transaction=True)
        pipe.hset(KEY, mapping={
            "last_pass_seconds": seconds, "last_policy_seconds": policy_ms / 1000.0,
            "last_placed": placed, "last_queued": queued, "last_timestamp": time.time(),
        })
        pipe.hincrby(KEY, "count", 1)
        pipe.hincrbyfloat(KEY, "sum", seconds)
        pipe.hincrby(KEY, "placed_total", placed)
        # Only the bucket the pass falls in is counted; the reader makes them cumulative.
        bucket = next((le for le in BUCKETS if seconds <= le), None)
        if bucket is not None:
            pipe.hincrby(KEY, _bucket_field(bucket), 1)
        pipe.execute()
    except Exception:  # noqa: BLE001 - any Redis or network error: the pass itself succeeded
        _failed(url, "record")


@dataclass(frozen=True)
class PassStats:
    count: int
    sum_s: float
    # Cumulative (upper bound, count) pairs, ending with (inf, count), as Prometheus wants them.
    buckets: list[tuple[float, int]]
    placed_total: int
    last_pass_s: float | None
    last_policy_s: float | None
    last_placed: int | None
    last_queued: int | None
    last_timestamp: float | None


def read_stats() -> PassStats | None:
    """The stats as recorded so far; None when Redis does not answer (the caller says so)."""
    url = settings.REDIS_URL
    if not _available(url):
        return None
    try:
        raw = _client(url).hgetall(KEY)
    except Exception:  # noqa: BLE001
        _failed(url, "read")
        return None
    values = {k.decode(): v.decode() for k, v in raw.items()}

    def number(name: str, kind: type = float) -> float | int | None:
        value = values.get(name)
        return kind(float(value)) if value is not None else None

    count = int(number("count") or 0)
    running = 0
    buckets = []
    for le in BUCKETS:
        running += int(number(_bucket_field(le)) or 0)
        buckets.append((le, running))
    buckets.append((float("inf"), count))
    return PassStats(
        count=count, sum_s=float(number("sum") or 0.0), buckets=buckets,
        placed_total=int(number("placed_total") or 0),
        last_pass_s=number("last_pass_seconds"), last_policy_s=number("last_policy_seconds"),
        last_placed=number("last_placed", int), last_queued=number("last_queued", int),
        last_timestamp=number("last_timestamp"),
    )


def reset() -> None:
    """Forget the stats and any backoff (tests, and an operator starting over)."""
    _down_until.clear()
    url = settings.REDIS_URL
    try:
        _client(url).delete(KEY)
    except Exception:  # noqa: BLE001
        log.warning("Could not reset scheduling-pass stats in Redis.", exc_info=True)
