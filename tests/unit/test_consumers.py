"""`/ws/events/` on the real ASGI application (origin check, session/token auth, routing, consumer) with
the in-memory channel layer. Events come from the real code paths: a submission through the API, a
scheduling pass, a worker's progress report, a heartbeat, a node drain.

Bob is on Alice's team and hears her job's state, progress and log, her node's state and telemetry;
Charlie (team B) hears none of it, and cannot subscribe to her job; Dana (staff) hears both teams."""
from __future__ import annotations

import json
import logging

import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.db import connections, transaction
from django.test import Client
from rest_framework.authtoken.models import Token

from apps.cluster.agent import record_heartbeat
from apps.cluster.models import GpuNode
from apps.cluster.services import set_node_state
from apps.dashboard import events
from apps.dashboard.consumers import CLOSE_UNAUTHENTICATED
from apps.scheduling import reports
from apps.scheduling.live import run_pass
from deepopt_web.asgi import application
from tests.conftest import COMPRESSION_JOB
from tests.threads import in_thread

pytestmark = pytest.mark.django_db(transaction=True)

ORIGIN = (b"origin", b"http://localhost")
CLUSTER_KEYS = {"scope", "queued", "placed", "running", "gpus_total", "gpus_busy"}


def token_of(user) -> str:
    return Token.objects.get_or_create(user=user)[0].key


def session_cookie_of(user) -> str:
    client = Client()
    client.force_login(user)
    return f"sessionid={client.cookies['sessionid'].value}"


async def open_socket(*, token: str | None = None, cookie: str | None = None, origin=ORIGIN) -> WebsocketCommunicator:
    headers = [origin] if origin else []
    if cookie:
        headers.append((b"cookie", cookie.encode()))
    path = "/ws/events/" + (f"?token={token}" if token is not None else "")
    socket = WebsocketCommunicator(application, path, headers=headers)
    socket.accepted, _ = await socket.connect()
    return socket


async def hello(socket: WebsocketCommunicator) -> dict:
    message = await socket.receive_json_from()
    assert message["type"] == "hello", message
    return message["data"]


async def until(socket: WebsocketCommunicator, last, timeout: float = 3) -> list[dict]:
    """Every message up to and including the first for which last(message) is true."""
    seen = []
    while True:
        message = await socket.receive_json_from(timeout)
        seen.append(message)
        if last(message):
            return seen


def sentinel(team) -> None:
    events.publish([events.team_group(team.pk)], "test.sentinel", {"team": team.pk})


def is_sentinel(team):
    return lambda m: m["type"] == "test.sentinel" and m["data"]["team"] == team.pk


def run(scenario, *args):
    """Run an async scenario to its end on an event loop of its own, in a thread of its own: after a browser
    test, Playwright's loop stays running in the main thread, where async_to_sync refuses to run."""
    return in_thread(lambda: async_to_sync(scenario)(*args), timeout=60, cleanup=connections.close_all)


@pytest.fixture(autouse=True)
def clean_layer():
    run(get_channel_layer().flush)


def test_a_socket_without_credentials_is_refused_with_4401():
    async def scenario():
        socket = await open_socket()
        assert socket.accepted
        closed = await socket.receive_output()
        assert closed == {"type": "websocket.close", "code": CLOSE_UNAUTHENTICATED}
        await socket.wait()

    run(scenario)


def test_an_unknown_token_is_refused_even_with_a_valid_session(bob):
    cookie = session_cookie_of(bob)

    async def scenario():
        socket = await open_socket(token="0" * 40, cookie=cookie)
        assert await socket.receive_output() == {"type": "websocket.close", "code": CLOSE_UNAUTHENTICATED}

    run(scenario)


@pytest.mark.parametrize("token", ["%00", "ab%00cd", "%C2%B2", "a b"])
def test_a_token_that_cannot_be_a_key_is_refused_without_a_query(bob, token):
    cookie = session_cookie_of(bob)

    async def scenario():
        socket = await open_socket(token=token, cookie=cookie)
        assert await socket.receive_output() == {"type": "websocket.close", "code": CLOSE_UNAUTHENTICATED}

    run(scenario)


def test_an_inactive_users_token_is_refused(bob):
    key = token_of(bob)
    bob.is_active = False
    bob.save()

    async def scenario():
        socket = await open_socket(token=key)
        assert await socket.receive_output() == {"type": "websocket.close", "code": CLOSE_UNAUTHENTICATED}

    run(scenario)


def test_a_page_of_another_site_cannot_open_a_socket_with_the_users_cookie(bob):
    cookie = session_cookie_of(bob)

    async def scenario():
        socket = await open_socket(cookie=cookie, origin=(b"origin", b"https://evil.example"))
        assert not socket.accepted

    run(scenario)


def test_token_auth_joins_the_cluster_and_the_users_team_groups(bob, team_a):
    key = token_of(bob)

    async def scenario():
        socket = await open_socket(token=key)
        assert socket.accepted
        assert await hello(socket) == {"user": "bob", "staff": False, "groups": ["cluster", f"team.{team_a.pk}"]}
        await socket.disconnect()

    run(scenario)


def test_session_auth_works_and_a_staff_socket_joins_the_staff_group(dana, bob, team_a):
    cookies = session_cookie_of(dana), session_cookie_of(bob)

    async def scenario():
        staff, member = [await open_socket(cookie=c) for c in cookies]
        assert await hello(staff) == {"user": "dana", "staff": True, "groups": ["cluster"]}
        assert (await hello(member))["groups"] == ["cluster", f"team.{team_a.pk}"]
        await staff.disconnect()
        await member.disconnect()

    run(scenario)


def test_charlie_never_hears_team_a_while_bob_and_staff_do(alice, bob, charlie, dana, team_a, team_b, node_a,
                                                           node_b, client_for):
    keys = {name: token_of(user) for name, user in (("bob", bob), ("charlie", charlie), ("dana", dana))}
    api = client_for(alice)

    @database_sync_to_async
    def submit() -> int:
        response = api.post("/api/v1/jobs/", {**COMPRESSION_JOB, "team": team_a.pk}, format="json")
        assert response.status_code == 201, response.content
        return response.json()["id"]

    @database_sync_to_async
    def the_job_runs_and_reports(job_id: int) -> None:
        set_node_state(node_b, GpuNode.State.DRAINING)  # so the job lands on Alice's node
        assert run_pass().placed == [job_id]
        answer = reports.progress(node_a, job_id, 1, rank=0, run_id="run-1", seq=1, pid=4321, lines=[
            {"type": "progress", "stage": "quantize", "step": 3, "steps": 12, "loss": 0.25},
            {"type": "log", "message": "layer 3 of 12 quantized to int8"},
        ])
        assert answer.status == "accepted"
        record_heartbeat(node_a, host={"cpu_percent": 12.5, "memory_used_mb": 2048, "memory_total_mb": 8192},
                         gpus=[{"index": 0, "utilization": 87.0, "memory_used_mb": 9000, "memory_total_mb": 143771}])
        sentinel(team_a)
        sentinel(team_b)

    async def scenario():
        bob_ws, charlie_ws, dana_ws = [await open_socket(token=keys[n]) for n in ("bob", "charlie", "dana")]
        for socket in (bob_ws, charlie_ws, dana_ws):
            await hello(socket)
        job_id = await submit()

        await bob_ws.send_json_to({"subscribe": "job", "id": job_id})
        await charlie_ws.send_json_to({"subscribe": "job", "id": job_id})
        await dana_ws.send_json_to({"subscribe": "job", "id": job_id})
        heard = {"charlie": await until(charlie_ws, lambda m: m["type"] == "error"),
                 "bob": await until(bob_ws, lambda m: m["type"] == "subscribed")}
        assert heard["charlie"][-1]["data"] == {"message": f"No job {job_id} that you can see.",
                                                "request": {"subscribe": "job", "id": job_id}}
        dana_heard = await until(dana_ws, lambda m: m["type"] == "subscribed")

        await the_job_runs_and_reports(job_id)
        heard["bob"] += await until(bob_ws, is_sentinel(team_a))
        heard["charlie"] += await until(charlie_ws, is_sentinel(team_b))
        dana_heard += await until(dana_ws, is_sentinel(team_a))
        if not any(is_sentinel(team_b)(m) for m in dana_heard):
            dana_heard += await until(dana_ws, is_sentinel(team_b))
        for socket in (bob_ws, charlie_ws, dana_ws):
            assert await socket.receive_nothing(0.1)
            await socket.disconnect()
        return job_id, heard, dana_heard

    job_id, heard, dana_heard = run(scenario)

    def of_type(messages, type_):
        return [m for m in messages if m["type"] == type_]

    bob = heard["bob"]
    states = [(m["data"]["from_state"], m["data"]["state"]) for m in of_type(bob, "job.state")]
    assert states == [("", "queued"), ("queued", "allocated"), ("allocated", "running")]
    new_job = of_type(bob, "job.state")[0]["data"]
    assert (new_job["id"], new_job["team"], new_job["team_name"], new_job["submitter"]) == (
        job_id, team_a.pk, "Team A", "alice")
    assert set(new_job) >= {"name", "kind", "priority", "gpus", "submitted_at", "pending_reason"}
    progress = of_type(bob, "job.progress")
    assert len(progress) == 1
    assert progress[0]["data"]["percent"] == 25.0
    assert progress[0]["data"]["metrics"] == {"loss": 0.25}
    assert progress[0]["data"]["lines"][1] == "log, layer 3 of 12 quantized to int8"
    assert progress[0]["ts"].endswith("+00:00")
    queue = [m["data"] for m in of_type(bob, "queue.changed") if m["data"]["scope"] == "team"]
    assert queue
    assert queue[-1]["usage"]["gpus_in_use"] == 1
    assert queue[-1]["usage"]["running_jobs"] == 1
    node_states = of_type(bob, "node.state")
    assert [(m["data"]["id"], m["data"]["busy"]) for m in node_states] == [(node_a.pk, [0])]
    telemetry = of_type(bob, "node.telemetry")
    assert telemetry[0]["data"]["gpus"][0]["utilization"] == 87.0
    assert not [m for m in bob if m["data"].get("team") == team_b.pk]

    charlie = heard["charlie"]
    assert [m["data"]["id"] for m in of_type(charlie, "node.state")] == [node_b.pk]
    for message in charlie:
        data = message["data"]
        if message["type"] == "error":
            continue
        assert data.get("team") != team_a.pk, message
        if message["type"].startswith("job."):
            raise AssertionError(f"Charlie heard of a job: {message}")
        if message["type"] == "node.state":
            assert data["id"] == node_b.pk, message
        if message["type"] == "queue.changed":
            assert data["scope"] == "cluster", message
            assert set(data) <= CLUSTER_KEYS, message
        if message["type"] == "cluster.capacity":  # the cluster's active GPUs, which every chart shows
            assert set(data) == {"active_gpus"}, message
    assert {m["type"] for m in charlie} <= {"queue.changed", "node.state", "cluster.capacity", "test.sentinel", "error"}
    # node_b drained: every socket hears the cluster's new active capacity (node_a's 8 GPUs).
    assert [m["data"] for m in of_type(charlie, "cluster.capacity")] == [{"active_gpus": 8}]
    assert [m["data"] for m in of_type(bob, "cluster.capacity")] == [{"active_gpus": 8}]

    dana_types = {(m["type"], m["data"].get("team")) for m in dana_heard}
    assert {("job.progress", team_a.pk), ("node.telemetry", team_a.pk), ("node.state", team_b.pk)} <= dana_types
    # Staff hear a job they follow once, through the staff group, not twice.
    assert len(of_type(dana_heard, "job.progress")) == 1


def test_a_subscription_needs_a_job_id_and_bad_messages_get_an_error(bob):
    key = token_of(bob)

    async def scenario():
        socket = await open_socket(token=key)
        await hello(socket)
        replies = []
        for text in ('{"subscribe": "job", "id": "7"}', '{"subscribe": "team", "id": 1}', "not json", "[1]",
                     '{"subscribe": "job", "id": 999999}', '{"type": "ping"}'):
            await socket.send_to(text_data=text)
            replies.append(await socket.receive_json_from())
        await socket.disconnect()
        return replies

    replies = run(scenario)
    assert [r["type"] for r in replies] == ["error"] * 5 + ["pong"]
    assert replies[0]["data"]["message"] == "`id` must be a job id (a positive integer)."
    assert "Only jobs" in replies[1]["data"]["message"]
    assert replies[2]["data"]["message"] == "The message is not JSON."
    assert replies[4]["data"]["message"] == "No job 999999 that you can see."


def test_a_rolled_back_change_publishes_nothing(bob, team_a):
    key = token_of(bob)

    @database_sync_to_async
    def rolled_back_then_committed() -> None:
        try:
            with transaction.atomic():
                events.publish([events.team_group(team_a.pk)], "job.state", {"id": 1})
                raise RuntimeError("rolled back")
        except RuntimeError:
            pass
        sentinel(team_a)

    async def scenario():
        socket = await open_socket(token=key)
        await hello(socket)
        await rolled_back_then_committed()
        heard = await until(socket, is_sentinel(team_a))
        await socket.disconnect()
        return heard

    assert [m["type"] for m in run(scenario)] == ["test.sentinel"]


def test_publishing_with_redis_down_neither_raises_nor_blocks(settings, team_a, caplog):
    import asyncio
    import time

    settings.CHANNEL_LAYERS = {"default": {
        "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
        "CONFIG": {"hosts": [{"address": "redis://127.0.0.1:9/0", "socket_connect_timeout": 0.2}]}}}
    events._last_warning[:] = [0.0, 0]

    async def scenario():
        def twenty_heartbeats() -> float:
            started = time.perf_counter()
            for _ in range(20):
                events.publish([events.team_group(team_a.pk)], "node.telemetry", {"node": 1})
            return time.perf_counter() - started

        took = await asyncio.to_thread(twenty_heartbeats)
        assert await asyncio.to_thread(events.flush_pending, 5)
        return took

    with caplog.at_level(logging.WARNING, logger="apps.dashboard.events"):
        assert run(scenario) < 0.1
    assert "live events fail" in caplog.text


def test_the_pipelined_publisher_reaches_a_real_redis_pubsub_layer(settings, team_a):
    """The background sender writes PUBLISH commands itself; a socket's layer must read them as its own."""
    import asyncio

    import redis

    url = "redis://127.0.0.1:6379/12"
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    except (redis.RedisError, OSError) as exc:
        pytest.skip(f"Redis does not answer on {url} ({exc}).")
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
                                           "CONFIG": {"hosts": [url], "prefix": "deepopt-test"}}}
    group = events.team_group(team_a.pk)

    async def scenario():
        layer = get_channel_layer()
        channel = await layer.new_channel()
        await layer.group_add(group, channel)
        # A thread without an event loop, as a Celery task or a gunicorn request: the pipelined path.
        await asyncio.to_thread(events.publish, [group], "job.state", {"id": 7, "state": "queued"})
        assert await asyncio.to_thread(events.flush_pending)
        message = await asyncio.wait_for(layer.receive(channel), 5)
        await layer.flush()
        return message

    message = run(scenario)
    assert message["type"] == events.LAYER_MESSAGE_TYPE
    assert message["group"] == group
    assert json.loads(message["text"])["data"] == {"id": 7, "state": "queued"}


def test_a_job_cancelled_in_the_queue_brings_its_teams_counts_with_it(alice, bob, team_a, node_a, client_for):
    key = token_of(bob)
    api = client_for(alice)

    @database_sync_to_async
    def submit_and_cancel() -> int:
        job_id = api.post("/api/v1/jobs/", {**COMPRESSION_JOB, "team": team_a.pk}, format="json").json()["id"]
        assert api.post(f"/api/v1/jobs/{job_id}/cancel/").status_code == 200
        return job_id

    async def scenario():
        socket = await open_socket(token=key)
        await hello(socket)
        job_id = await submit_and_cancel()
        heard = await until(socket, lambda m: m["type"] == "job.state" and m["data"]["state"] == "cancelled")
        await socket.disconnect()
        return job_id, heard

    job_id, heard = run(scenario)
    submitted, cancelled = (m["data"] for m in heard if m["type"] == "job.state")
    # A new job carries only its team's queued count (the month's GPU-hours are not recomputed per submission).
    assert (submitted["id"], submitted["state"], submitted["usage"]) == (job_id, "queued", {"queued_jobs": 1})
    assert cancelled["usage"] == {"gpus_in_use": 0, "gpu_hours_this_month": 0.0, "queued_jobs": 0, "running_jobs": 0}


def test_a_member_removed_from_a_team_stops_hearing_it_on_the_open_socket(bob, team_a, team_b, alice, client_for):
    """No reconnect: the membership change moves the socket to its new groups at once."""
    from apps.accounts.models import Membership

    key = token_of(bob)
    job_id = client_for(alice).post("/api/v1/jobs/", COMPRESSION_JOB, format="json").json()["id"]

    async def scenario():
        socket = await open_socket(token=key)
        assert (await hello(socket))["groups"] == ["cluster", f"team.{team_a.pk}"]
        await socket.send_json_to({"subscribe": "job", "id": job_id})
        # The answer says where the job stands, so that a page rendered before it can catch up.
        assert await socket.receive_json_from() == {"type": "subscribed",
                                                    "data": {"job": job_id, "state": "queued", "attempt": 1}}

        await database_sync_to_async(lambda: Membership.objects.filter(user=bob, team=team_a).delete())()
        changed = (await until(socket, lambda m: m["type"] == "membership"))[-1]["data"]
        assert changed == {"staff": False, "groups": ["cluster"], "jobs": []}
        # Team A's events and the job's no longer reach Bob; the cluster's still do.
        await database_sync_to_async(sentinel)(team_a)
        await database_sync_to_async(events.publish)([events.job_group(job_id)], "job.progress", {"job": job_id})
        await database_sync_to_async(events.publish)([events.CLUSTER], "test.cluster", {})
        heard = await until(socket, lambda m: m["type"] == "test.cluster")
        assert [m["type"] for m in heard] == ["test.cluster"]

        # Joining team B is heard the same way, and team B's events then arrive.
        await database_sync_to_async(lambda: Membership.objects.create(user=bob, team=team_b))()
        changed = (await until(socket, lambda m: m["type"] == "membership"))[-1]["data"]
        assert changed["groups"] == ["cluster", f"team.{team_b.pk}"]
        await database_sync_to_async(sentinel)(team_b)
        assert (await until(socket, is_sentinel(team_b)))[-1]["data"] == {"team": team_b.pk}
        # The user's own group is not an event stream: nothing published there is forwarded as it is.
        await database_sync_to_async(events.publish)([events.user_group(bob.pk)], "test.private", {})
        await database_sync_to_async(events.publish)([events.CLUSTER], "test.cluster", {})
        heard = await until(socket, lambda m: m["type"] == "test.cluster")
        assert "test.private" not in [m["type"] for m in heard]
        await socket.disconnect()

    run(scenario)


def test_a_deactivated_user_is_closed_and_staff_never_hear_a_users_control_group(bob, dana, team_a):
    keys = token_of(bob), token_of(dana)

    async def scenario():
        member, staff = [await open_socket(token=k) for k in keys]
        await hello(member)
        await hello(staff)

        def deactivate():
            bob.is_active = False
            bob.save()

        await database_sync_to_async(deactivate)()
        closed = None
        while closed is None or closed.get("type") != "websocket.close":
            closed = await member.receive_output(3)
        assert closed["code"] == CLOSE_UNAUTHENTICATED
        await database_sync_to_async(events.publish)([events.CLUSTER], "test.cluster", {})
        heard = await until(staff, lambda m: m["type"] == "test.cluster")
        assert [m["type"] for m in heard] == ["test.cluster"]
        await staff.disconnect()

    run(scenario)
