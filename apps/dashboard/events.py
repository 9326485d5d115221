"""Live events for the pages (`/ws/events/`): the groups a socket may hear and the one way to send to them.

A socket joins CLUSTER, the groups of its user's teams (staff join STAFF instead) and, on request, the
groups of jobs it may see (consumers.py). Every event is one JSON text `{"type", "ts", "data"}`; it is
serialised once here and the consumer forwards the text as it is, so fanning one event out to 2,000
sockets costs no JSON encoding per socket.

`publish()` never blocks its caller on Redis and never raises into it: a submission or a heartbeat must
not fail, nor wait, because the live view is down. It sends after the current transaction commits, so a
page never shows a change that was rolled back. How it reaches the channel layer depends on the caller:
- async code (a consumer): a task on the running loop;
- sync code (request threads under daphne or gunicorn, Celery, commands) with the Redis pub/sub layer:
  a daemon thread that sends whatever queued up in one pipelined round trip (~26 µs of CPU per event,
  against ~310 µs through the layer's asyncio client; docs/architecture.md, "Live updates");
- sync code with another layer: the event loop that runs the thread (daphne, tests), else the same
  daemon thread through the layer's async API on a loop of its own.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import threading
import time
import weakref
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


USER_PREFIX = "user."


def user_group(user_id: int) -> str:
    """One user's sockets; only control messages (their teams changed) go there, never another's events."""
    return f"{USER_PREFIX}{int(user_id)}"


def _scoped(groups: Iterable[str]) -> list[str]:
    """The groups, de-duplicated, plus STAFF when any of them is a team's or a job's: staff see all."""
    unique = list(dict.fromkeys(groups))
    if any(g not in (CLUSTER, STAFF) and not g.startswith(USER_PREFIX) for g in unique) and STAFF not in unique:
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
    if _Sender.pipelines(layer):
        _Sender.get().submit(layer, groups, message)
        return
    # Other layers (the in-memory one of the tests) belong to the loop their sockets run on: a thread
    # that sync_to_async runs for an event loop (daphne, tests) hands the send to that loop.
    caller_loop = getattr(SyncToAsync.threadlocal, "main_event_loop", None)
    if (caller_loop is not None and getattr(SyncToAsync.threadlocal, "main_event_loop_pid", None) == os.getpid()
            and caller_loop.is_running() and not caller_loop.is_closed()):
        caller_loop.call_soon_threadsafe(lambda: _track(caller_loop.create_task(_group_send(layer, groups, message))))
        return
    _Sender.get().submit(layer, groups, message)


def _addressed(message: dict, group: str) -> dict:
    # The group's name travels along: a process's hub (hub.py) hears many groups on one channel.
    return {**message, "group": group}


async def _group_send(layer, groups: list[str], message: dict) -> None:  # noqa: ANN001
    for group in groups:
        try:
            await asyncio.wait_for(layer.group_send(group, _addressed(message, group)), SEND_TIMEOUT_S)
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


class _PubSubPipeline:
    """Group sends of the Redis pub/sub layer as pipelined PUBLISH commands on a plain Redis client.

    A group send of that layer is one PUBLISH of the serialised message to a channel named after the
    group; through the layer's asyncio client it cost ~100 µs of CPU per group here, pipelined in
    batches ~7 µs (docs/architecture.md, "Live updates"). The names, shards and serialisation are the
    layer's own (a per-loop layer object, never connected, is asked); tests/unit/test_consumers.py checks
    against a real pub/sub layer that what is sent this way arrives.
    """

    def __init__(self, layer) -> None:  # noqa: ANN001
        import redis
        from channels_redis.pubsub import RedisPubSubLoopLayer

        self.layer = layer
        self.names = RedisPubSubLoopLayer(*layer._args, **layer._kwargs, channel_layer=layer)
        self.clients = []
        for host in (shard.host for shard in self.names._shards):
            options = dict(host)
            address = options.pop("address")
            self.clients.append(redis.Redis.from_url(address, **options))

    @staticmethod
    def supports(layer) -> bool:  # noqa: ANN001
        from channels_redis.pubsub import RedisPubSubChannelLayer

        if type(layer) is not RedisPubSubChannelLayer:
            return False
        hosts = layer._kwargs.get("hosts") or [None]
        return all(isinstance(h, str) or (isinstance(h, dict) and "address" in h) for h in hosts)

    def send(self, batch: list[tuple[list[str], dict]]) -> None:
        pipes = [client.pipeline(transaction=False) for client in self.clients]
        for groups, message in batch:
            for group in groups:
                name = self.names._get_group_channel_name(group)
                shard = self.names._shards.index(self.names._get_shard(name))
                pipes[shard].publish(name, self.layer.serialize(_addressed(message, group)))
        for pipe in pipes:
            if len(pipe):
                pipe.execute()


class _Sender:
    """A daemon thread for publishers without an event loop of their own (one per process). It takes
    whatever has queued up since its last round and sends it in one go: pipelined for the Redis pub/sub
    layer, through the layer's async API (on a loop of its own) for any other."""

    _instance: _Sender | None = None
    _lock = threading.Lock()
    _supported: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.backlog = 0
        self.dropped = 0
        self.count_lock = threading.Lock()  # publishers in many threads, completions in the sender's
        self.idle = threading.Condition(self.count_lock)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.pipelines_of: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.thread = threading.Thread(target=self._run, name="deepopt-events", daemon=True)
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

    @classmethod
    def pipelines(cls, layer) -> bool:  # noqa: ANN001
        supported = cls._supported.get(layer)
        if supported is None:
            supported = cls._supported[layer] = _PubSubPipeline.supports(layer)
        return supported

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
        self.queue.put((layer, groups, message))

    def _run(self) -> None:
        while True:
            batch = [self.queue.get()]
            while len(batch) < 1000:
                try:
                    batch.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            by_layer: dict[int, list] = {}
            for layer, groups, message in batch:
                by_layer.setdefault(id(layer), [layer, []])[1].append((groups, message))
            for layer, items in by_layer.values():
                try:
                    self._send(layer, items)
                except Exception:  # noqa: BLE001 - Redis down or slow: these events are lost, later ones may pass
                    _warn(f"Could not publish {len(items)} live event(s).")
            with self.count_lock:
                self.backlog -= len(batch)
                if not self.backlog:
                    self.idle.notify_all()

    def _send(self, layer, items: list[tuple[list[str], dict]]) -> None:  # noqa: ANN001
        if self.pipelines(layer):
            pipeline = self.pipelines_of.get(layer)
            if pipeline is None:
                pipeline = self.pipelines_of[layer] = _PubSubPipeline(layer)
            pipeline.send(items)
            return
        if self.loop is None:
            self.loop = asyncio.new_event_loop()

        async def send_all() -> None:
            for groups, message in items:
                await _group_send(layer, groups, message)

        self.loop.run_until_complete(send_all())

    def drain(self, timeout: float = 5.0) -> bool:
        """Wait until every submitted event has left (tests, benchmarks)."""
        with self.count_lock:
            return self.idle.wait_for(lambda: not self.backlog, timeout)


def flush_pending(timeout: float = 5.0) -> bool:
    """Block until events published from this process's background sender have left it."""
    instance = _Sender._instance
    if instance is None or instance.pid != os.getpid():
        return True
    return instance.drain(timeout)
