"""Live events for the pages (`/ws/events/`): the groups a socket may hear and the one way to send to them.

A socket joins CLUSTER, the groups of its user's teams (staff join STAFF instead) and, on request, the
groups of jobs it may see (consumers.py). Every event is one JSON text `{"type", "ts", "data"}`; it is
serialised once here and the consumer forwards the text as it is, so fanning one event out to 2,000
sockets costs no JSON encoding per socket.

`publish()` never blocks its caller on Redis and never raises into it: a submission or a heartbeat must
not fail, nor wait, because the live view is down. It sends after the current transaction commits, so a
page never shows a change that was rolled back. How it reaches the channel layer depends on the caller:
- async code (a consumer): a task on the running loop;
- sync code that an event loop runs in a thread (a Django view under daphne, `database_sync_to_async`):
  a task on that loop, which already holds the layer's Redis connection;
- anything else (Celery workers, gunicorn threads, management commands): a daemon thread with an event
  loop of its own, so the layer keeps one connection per process instead of one per event.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import Iterable
from datetime import UTC, datetime

from asgiref.sync import SyncToAsync
from channels.layers import get_channel_layer
from django.core.serializers.json import DjangoJSONEncoder
from django.db import transaction

log = logging.getLogger(__name__)

CLUSTER = "cluster"
STAFF = "staff"
# The channel-layer message type; Channels calls the consumer's `deepopt_event` handler for it.
LAYER_MESSAGE_TYPE = "deepopt.event"
# Events waiting for the background sender beyond this are dropped (and logged): a live view that
# cannot keep up must not eat the memory of a Celery worker.
MAX_BACKLOG = 10_000
# A Redis that accepts the connection but never answers must not pile up sends for ever.
SEND_TIMEOUT_S = 2.0


def team_group(team_id: int) -> str:
    return f"team.{int(team_id)}"


def job_group(job_id: int) -> str:
    return f"job.{int(job_id)}"


def _scoped(groups: Iterable[str]) -> list[str]:
    """The groups, de-duplicated, plus STAFF when any of them is a team's or a job's: staff see all."""
    unique = list(dict.fromkeys(groups))
    if any(g not in (CLUSTER, STAFF) for g in unique) and STAFF not in unique:
        unique.append(STAFF)
    return unique


def encode(type: str, data: dict) -> str:  # noqa: A002 - the event's field is called type
    return json.dumps({"type": type, "ts": datetime.now(UTC).isoformat(), "data": data},
                      cls=DjangoJSONEncoder, separators=(",", ":"))


def publish(groups: Iterable[str], type: str, data: dict) -> None:  # noqa: A002
    """Send `{"type": type, "ts": …, "data": data}` to each group once the current transaction commits.

    Cheap and safe to call from any code path: it returns at once, and a channel layer that is down
    or missing is logged, never raised.
    """
    targets = _scoped(groups)
    if not targets:
        return

    def send() -> None:
        try:
            _send(targets, encode(type, data))
        except Exception:  # noqa: BLE001 - the live view must never break the caller
            _warn(f"Could not publish {type} to {targets}.")

    # Only inside a transaction is there a commit to wait for. Asking the connection about autocommit
    # (as on_commit does outside one) would open it, which async code may not do.
    if transaction.get_connection().in_atomic_block:
        transaction.on_commit(send)
    else:
        send()


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _send(groups: list[str], text: str) -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    message = {"type": LAYER_MESSAGE_TYPE, "text": text}
    if _in_event_loop():
        _track(asyncio.get_running_loop().create_task(_group_send(layer, groups, message)))
        return
    # A thread that sync_to_async runs for an event loop (daphne, tests): hand the send to that loop.
    caller_loop = getattr(SyncToAsync.threadlocal, "main_event_loop", None)
    if (caller_loop is not None and getattr(SyncToAsync.threadlocal, "main_event_loop_pid", None) == os.getpid()
            and caller_loop.is_running() and not caller_loop.is_closed()):
        caller_loop.call_soon_threadsafe(lambda: _track(caller_loop.create_task(_group_send(layer, groups, message))))
        return
    _Sender.get().submit(layer, groups, message)


async def _group_send(layer, groups: list[str], message: dict) -> None:  # noqa: ANN001
    for group in groups:
        try:
            # The group's name travels along: a process's hub (hub.py) hears many groups on one channel.
            await asyncio.wait_for(layer.group_send(group, {**message, "group": group}), SEND_TIMEOUT_S)
        except Exception:  # noqa: BLE001
            _warn(f"Could not send an event to group {group}.")


_last_warning = [0.0, 0]  # when the last warning was logged, and how many were held back since


def _warn(what: str) -> None:
    """Log a failed send at most every 30 s: with Redis down, 50 heartbeats a second would flood the log."""
    now = time.monotonic()
    if now - _last_warning[0] < 30:
        _last_warning[1] += 1
        return
    held, _last_warning[:] = _last_warning[1], [now, 0]
    log.warning("%s (live events fail; %d similar warnings held back)", what, held, exc_info=True)


_tasks: set[asyncio.Task] = set()


def _track(task: asyncio.Task) -> None:
    # The loop keeps only weak references to tasks: hold each until it is done.
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


class _Sender:
    """A daemon thread with its own event loop, for publishers that have none (one per process)."""

    _instance: _Sender | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self.backlog = 0
        self.dropped = 0
        self.count_lock = threading.Lock()  # publishers in many threads, completions in the loop's
        self.thread = threading.Thread(target=self.loop.run_forever, name="deepopt-events", daemon=True)
        self.thread.start()

    @classmethod
    def get(cls) -> _Sender:
        instance = cls._instance
        # A forked Celery child inherits the object but not the thread: start its own.
        if instance is None or instance.pid != os.getpid() or not instance.thread.is_alive():
            with cls._lock:
                instance = cls._instance
                if instance is None or instance.pid != os.getpid() or not instance.thread.is_alive():
                    instance = cls._instance = cls()
        return instance

    def submit(self, layer, groups: list[str], message: dict) -> None:  # noqa: ANN001
        with self.count_lock:
            full = self.backlog >= MAX_BACKLOG
            if full:
                self.dropped += 1
            else:
                self.backlog += 1
        if full:
            _warn(f"The live-event sender is {self.backlog} events behind; {self.dropped} dropped so far.")
            return
        self.loop.call_soon_threadsafe(self._start, layer, groups, message)

    def _start(self, layer, groups: list[str], message: dict) -> None:  # noqa: ANN001
        task = self.loop.create_task(_group_send(layer, groups, message))
        _track(task)
        task.add_done_callback(self._done)

    def _done(self, _task: asyncio.Task) -> None:
        with self.count_lock:
            self.backlog -= 1

    def drain(self, timeout: float = 5.0) -> bool:
        """Wait until every submitted event has been handed to the layer (tests, benchmarks)."""
        done = threading.Event()

        async def wait() -> None:
            while self.backlog:
                await asyncio.sleep(0.005)
            done.set()

        self.loop.call_soon_threadsafe(lambda: _track(self.loop.create_task(wait())))
        return done.wait(timeout)


def flush_pending(timeout: float = 5.0) -> bool:
    """Block until events published from this process's background sender have left it."""
    instance = _Sender._instance
    if instance is None or instance.pid != os.getpid():
        return True
    return instance.drain(timeout)
