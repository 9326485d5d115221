"""`/ws/events/`: the live event stream of the pages.

A socket is authenticated by the session (the pages) or by `?token=` (an API token; middleware.py), and
refused with close code 4401 otherwise. It joins the cluster group and its user's team groups (staff:
the staff group, which hears every team's and job's events); a job's group only on request,
`{"subscribe": "job", "id": N}`, after the same visibility check the API makes, so a job the user cannot
see is answered with an error (the same words as for a job that does not exist) and never subscribed.

The user's teams are read when the socket connects and again whenever they change: every socket also
joins its user's own group, which hears only "your teams changed" (fanout.on_membership_changed, sent
when a Membership is saved or deleted or the user is saved). The socket then re-reads the user and their
teams, leaves the groups it may no longer hear (team groups, and the groups of jobs it can no longer see)
and joins the new ones, and tells the page (`membership`, with the new groups) so it can redraw; a user
deactivated or deleted meanwhile is closed with 4401.
"""
from __future__ import annotations

import asyncio
import json
import logging

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from .events import CLUSTER, STAFF, USER_PREFIX, job_group, team_group, user_group
from .hub import hub

log = logging.getLogger(__name__)

CLOSE_UNAUTHENTICATED = 4401
MAX_JOB_SUBSCRIPTIONS = 50  # a page follows one job; a tab left open on many has no need for more
MAX_MESSAGE_BYTES = 4096


@database_sync_to_async
def _team_ids(user) -> set[int]:  # noqa: ANN001
    from apps.accounts.permissions import team_ids_of

    return set(team_ids_of(user))


@database_sync_to_async
def _can_see_job(user, job_id: int) -> bool:  # noqa: ANN001
    from apps.scheduling.models import Job

    return Job.objects.visible_to(user).filter(pk=job_id).exists()


@database_sync_to_async
def _job_now(job_id: int) -> dict:
    """The job's state and attempt as the database has them (after the socket joined its group)."""
    from apps.scheduling.models import Job

    row = Job.objects.filter(pk=job_id).values("state", "attempt").first()
    return row or {}


@database_sync_to_async
def _fresh_user(user_id: int):  # noqa: ANN202
    """The user as the database has them now (no cached teams), or None when gone or deactivated."""
    from django.contrib.auth import get_user_model

    return get_user_model().objects.filter(pk=user_id, is_active=True).first()


@database_sync_to_async
def _visible_jobs(user, job_ids: set[int]) -> set[int]:  # noqa: ANN001
    from apps.scheduling.models import Job

    return set(Job.objects.visible_to(user).filter(pk__in=job_ids).values_list("pk", flat=True))


async def _groups_of(user) -> list[str]:  # noqa: ANN001
    if user.is_staff:
        return [CLUSTER, STAFF]
    return [CLUSTER, *(team_group(t) for t in sorted(await _team_ids(user)))]


class EventsConsumer(AsyncWebsocketConsumer):
    groups_joined: list[str]
    jobs: set[int]

    async def connect(self) -> None:
        self.groups_joined, self.jobs = [], set()
        self.lock = asyncio.Lock()  # a subscription and a membership refresh change the groups one at a time
        self.refreshes: set[asyncio.Task] = set()  # membership refreshes in flight (kept referenced)
        user = self.scope.get("user")
        await self.accept()
        if user is None or not user.is_authenticated:
            # Accepted first so the client gets the reason (a refused handshake shows only 1006) and
            # stops retrying; nothing was subscribed.
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        self.user = user
        groups = [*(await _groups_of(user)), user_group(user.pk)]
        for group in groups:
            await self._join(group)
        self.groups_joined = groups
        await self._reply("hello", {"user": user.get_username(), "staff": user.is_staff,
                                    "groups": self._shown(groups)})

    @staticmethod
    def _shown(groups: list[str]) -> list[str]:
        return [g for g in groups if g != STAFF and not g.startswith(USER_PREFIX)]

    async def refresh_groups(self) -> None:
        """Re-read the user and their teams; leave what they may no longer hear, join what they now may."""
        async with self.lock:
            if not self.groups_joined:
                return  # closed meanwhile
            user = await _fresh_user(self.user.pk)
            if user is None:
                await self._leave_all()
                await self.close(code=CLOSE_UNAUTHENTICATED)
                return
            jobs = await _visible_jobs(user, self.jobs) if self.jobs else set()
            new = [*(await _groups_of(user)), user_group(user.pk)]
            before = set(self.groups_joined) | ({job_group(j) for j in self.jobs} if not self._sees_all else set())
            after = set(new) | ({job_group(j) for j in jobs} if STAFF not in new else set())
            for group in sorted(before - after):
                await self._leave(group)
            for group in sorted(after - before):
                await self._join(group)
            self.user, self.groups_joined, self.jobs = user, new, jobs
            await self._reply("membership", {"staff": user.is_staff, "groups": self._shown(new),
                                             "jobs": sorted(jobs)})

    async def disconnect(self, code: int) -> None:
        lock = getattr(self, "lock", None)
        if lock is None:
            return
        async with lock:
            await self._leave_all()

    async def _leave_all(self) -> None:
        for group in self.groups_joined + [job_group(j) for j in self.jobs if not self._sees_all]:
            await self._leave(group)
        self.groups_joined, self.jobs = [], set()

    async def _join(self, group: str) -> None:
        if settings.DEEPOPT_LIVE_FANOUT == "hub":
            await hub().join(group, self)
        else:
            await self.channel_layer.group_add(group, self.channel_name)

    async def _leave(self, group: str) -> None:
        if settings.DEEPOPT_LIVE_FANOUT == "hub":
            await hub().leave(group, self)
        else:
            await self.channel_layer.group_discard(group, self.channel_name)

    @property
    def _sees_all(self) -> bool:
        return STAFF in self.groups_joined

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if not self.groups_joined:
            return
        if text_data is None or len(text_data) > MAX_MESSAGE_BYTES:
            await self._error("Send a JSON text message of at most 4 KB.")
            return
        try:
            message = json.loads(text_data)
        except ValueError:
            await self._error("The message is not JSON.")
            return
        if not isinstance(message, dict):
            await self._error('Expected an object such as {"subscribe": "job", "id": 12}.')
            return
        if "subscribe" in message:
            async with self.lock:
                await self._subscribe(message, subscribe=True)
        elif "unsubscribe" in message:
            async with self.lock:
                await self._subscribe(message, subscribe=False)
        elif message.get("type") == "ping":
            await self._reply("pong", {})
        else:
            await self._error('Unknown message; expected {"subscribe": "job", "id": N}, '
                              '{"unsubscribe": "job", "id": N} or {"type": "ping"}.')

    async def _subscribe(self, message: dict, *, subscribe: bool) -> None:
        verb = "subscribe" if subscribe else "unsubscribe"
        what, job_id = message.get(verb), message.get("id")
        if what != "job":
            await self._error(f'Only jobs can be subscribed to: {{"{verb}": "job", "id": N}}.', message)
            return
        if isinstance(job_id, bool) or not isinstance(job_id, int) or job_id < 1:
            await self._error("`id` must be a job id (a positive integer).", message)
            return
        if not subscribe:
            if job_id in self.jobs:
                self.jobs.discard(job_id)
                if not self._sees_all:
                    await self._leave(job_group(job_id))
            await self._reply("unsubscribed", {"job": job_id})
            return
        if job_id not in self.jobs:
            if len(self.jobs) >= MAX_JOB_SUBSCRIPTIONS:
                await self._error(f"At most {MAX_JOB_SUBSCRIPTIONS} jobs per socket.", message)
                return
            if not await _can_see_job(self.user, job_id):
                # The words of a job that does not exist: whether another team's job does is not ours to say.
                await self._error(f"No job {job_id} that you can see.", message)
                return
            self.jobs.add(job_id)
            # Staff hear every job's events through the staff group already; a second group would
            # deliver each twice.
            if not self._sees_all:
                await self._join(job_group(job_id))
        # Where the job stands now, read after joining: a change before this answer is in it, a change
        # after it is an event. A page rendered a moment before its socket connected catches up from it.
        await self._reply("subscribed", {"job": job_id, **(await _job_now(job_id))})

    async def deliver(self, message: dict) -> None:
        """A published event (events.LAYER_MESSAGE_TYPE), already JSON: forwarded as it is. The user's own
        group carries only "your teams changed", which is acted on here, not forwarded."""
        if message.get("group", "").startswith(USER_PREFIX):
            # Its own task: the hub delivers to many sockets in a loop and must not wait on this one's queries.
            task = asyncio.get_running_loop().create_task(self.refresh_groups())
            self.refreshes.add(task)
            task.add_done_callback(self.refreshes.discard)
            return
        await self.base_send({"type": "websocket.send", "text": message["text"]})

    # The same event when the socket joined the group itself (DEEPOPT_LIVE_FANOUT = "groups").
    deepopt_event = deliver

    async def _reply(self, type: str, data: dict) -> None:  # noqa: A002
        await self.send(text_data=json.dumps({"type": type, "data": data}))

    async def _error(self, text: str, request: dict | None = None) -> None:
        data = {"message": text}
        if request is not None:
            data["request"] = {k: request.get(k) for k in ("subscribe", "unsubscribe", "id") if k in request}
        await self._reply("error", data)
