"""One channel-layer subscriber per server process, fanning each group event out to the process's sockets.

With Channels' usual wiring every socket joins its groups itself: a group event is then taken off the
layer, decoded and dispatched once per socket, through a task switch and an `asyncio.wait` of that
socket's consumer. bench/websocket.py measured that at about 0.26 ms of server CPU per socket and event on
this project's 2-core machine (p95 0.37-0.43 s for 500 sockets; at 2,000, 0.86 s or no delivery at all),
against issue 7's goals of p95 < 0.15 s for 500 and < 0.5 s for 2,000. The hub joins each group once for
all of the process's sockets (one `group_add` on the layer, as a consumer would), receives each event
once, and hands the already-encoded text to each member socket in a plain loop: about 0.08 ms per socket
(p95 0.06-0.09 s for 500, 0.30-0.32 s for 2,000); docs/architecture.md ("Live updates") has the table.

Scoping is unchanged: a socket is a member of exactly the groups the consumer joined for it after its
checks, and the hub delivers a group's event to that group's members only. A hub belongs to one event
loop (daphne runs one); it starts with its first member and stops when its last one leaves.
"""
from __future__ import annotations

import asyncio
import logging
import weakref
from typing import Protocol

from channels.layers import get_channel_layer

log = logging.getLogger(__name__)

# The core Redis layer forgets group members after a day (its group_expiry); a hub lives longer.
REFRESH_GROUPS_S = 3600
YIELD_EVERY = 50


class Member(Protocol):
    async def deliver(self, message: dict) -> None: ...


class Hub:
    def __init__(self, layer) -> None:  # noqa: ANN001
        self.layer = layer
        self.members: dict[str, set[Member]] = {}
        self.channel: str | None = None
        self.tasks: list[asyncio.Task] = []
        self.lock = asyncio.Lock()  # group_add/discard and start/stop, in order

    async def join(self, group: str, member: Member) -> None:
        async with self.lock:
            if self.channel is None:
                # The default prefix: the core Redis layer serves all of a process's channels from one
                # receive loop, which pops only the keys of that prefix.
                self.channel = await self.layer.new_channel()
                self.tasks = [asyncio.create_task(self._receive()), asyncio.create_task(self._refresh())]
            members = self.members.get(group)
            if members is None:
                await self.layer.group_add(group, self.channel)
                members = self.members[group] = set()
            members.add(member)

    async def leave(self, group: str, member: Member) -> None:
        async with self.lock:
            members = self.members.get(group)
            if members is None or member not in members:
                return
            members.discard(member)
            if not members:
                del self.members[group]
                await self.layer.group_discard(group, self.channel)
            if not self.members:
                self._stop()

    def _stop(self) -> None:
        for task in self.tasks:
            task.cancel()  # the layer unsubscribes a channel whose receive is cancelled
        self.tasks, self.channel = [], None

    async def _receive(self) -> None:
        while True:
            try:
                message = await self.layer.receive(self.channel)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - Redis gone for a moment: keep the hub, try again
                log.warning("The live-event hub could not read from the channel layer.", exc_info=True)
                await asyncio.sleep(1)
                continue
            members = self.members.get(message.get("group", ""))
            if not members:
                continue
            for count, member in enumerate(tuple(members), 1):
                try:
                    await member.deliver(message)
                except Exception:  # noqa: BLE001 - one broken socket must not stop the others' events
                    log.warning("Could not deliver a live event to a socket.", exc_info=True)
                if count % YIELD_EVERY == 0:
                    # The server writes a socket's frame only when the loop runs again; without a pause the
                    # first socket would wait for the 2,000th to be served.
                    await asyncio.sleep(0)

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_GROUPS_S)
            async with self.lock:
                for group in list(self.members):
                    await self.layer.group_add(group, self.channel)


_hubs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Hub] = weakref.WeakKeyDictionary()


def hub() -> Hub:
    """This event loop's hub (created on first use)."""
    loop = asyncio.get_running_loop()
    found = _hubs.get(loop)
    if found is None:
        found = _hubs[loop] = Hub(get_channel_layer())
    return found
