"""Why each queued job is still waiting, in words a user can act on, and where it stands."""
from __future__ import annotations

import time as _time
from collections.abc import Callable
from heapq import merge
from typing import TYPE_CHECKING

from .types import Decision, Pending

if TYPE_CHECKING:
    from .engine import Scheduler
    from .queue import Entry


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    minutes = seconds // 60
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes:02d} min"
    return f"{hours // 24} days {hours % 24} h"


def default_format_time(t: float, now: float) -> str:
    """Wall-clock UTC for epoch times; 'in 2 h 05 min' for the virtual clock of a replay."""
    if t >= 1e9:
        stamp = _time.strftime("%H:%M" if t - now < 20 * 3600 else "%d %b %H:%M", _time.gmtime(t))
        return f"{stamp} UTC (in {_duration(t - now)})"
    return f"in {_duration(t - now)}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _memory(shape) -> str:
    return f" with {shape.memory_mb / 1024:g} GB" if shape.memory_mb else ""


def ordered(sched: Scheduler, now: float) -> list[tuple[tuple, Entry, float, float]]:
    """Every queued job in scheduler order, with its start and finish tags."""
    rows = []
    wfq = sched.config.policy == "wfq"
    aging = sched.config.aging_s
    for flow in sched.flows.values():
        subs = [s for s in flow.subs.values() if s.head < len(s.jobs)]
        if not subs:
            continue
        level = sched.teams[flow.team].level(now)
        finish = level
        for entry in merge(*(s.jobs[s.head:] for s in subs), key=lambda e: e.seq):
            start = finish
            finish = start + entry.inc
            if not wfq or now - entry.submit >= aging:
                key = (0, 0.0, entry.seq)
            else:
                key = (1, finish, entry.seq)
            rows.append((key, entry, start, finish))
    rows.sort(key=lambda row: row[0])
    return rows


def explain_pass(sched: Scheduler, decision: Decision, now: float,
                 format_time: Callable[[float, float], str] | None = None) -> None:
    fmt = format_time or default_format_time
    cluster = sched.cluster
    config = sched.config
    held = sched.reservation
    fits_cache: dict[tuple, bool] = {}
    wfq = config.policy == "wfq"

    def fits_ignoring_reservation(entry: Entry) -> bool:
        key = entry.shape.key
        if key not in fits_cache:
            fits_cache[key] = cluster.place(entry.shape) is not None
        return fits_cache[key]

    for position, (key, entry, start, finish) in enumerate(ordered(sched, now), start=1):
        shape = entry.shape
        book = sched.teams[entry.team]
        block = book.quota_block(entry.gpus, entry.est, now)
        behind = position - 1
        if block == "quota_per_job":
            code = block
            reason = (f"asks for {_plural(entry.gpus, 'GPU')}; team {book.name} may use at most "
                      f"{book.max_gpus_per_job} per job")
        elif not sched.can_ever(shape):
            code = "never_fits"
            if shape.nodes == 1:
                reason = f"no active node has {_plural(shape.gpus, 'GPU')}{_memory(shape)}"
            else:
                reason = (f"needs {shape.nodes} active nodes with {_plural(shape.per_node, 'GPU')}"
                          f"{_memory(shape)} each; the cluster has fewer")
        elif block == "max_gpus":
            code = block
            reason = f"team {book.name} is at {book.gpus_in_use}/{book.max_gpus} GPUs"
            if book.gpus_in_use < book.max_gpus:
                reason += f" and this job needs {entry.gpus}"
        elif block == "month_quota":
            code = block
            used = (book.month_used(now) + book.committed(now)) / 3600
            quota = book.month_quota_s / 3600
            reason = (f"over the monthly GPU-hour quota: team {book.name} has used or committed "
                      f"{used:.0f} of {quota:.0f} GPU-hours and this job needs about "
                      f"{entry.gpus * entry.est / 3600:.0f}")
        elif held is not None and held.entry is entry:
            code = "reserved"
            if shape.nodes == 1:
                where = f"{_plural(shape.gpus, 'GPU')}{_memory(shape)} on one node"
            else:
                racks = {cluster.rack[n] for n, _ in held.nodes}
                where = f"{shape.nodes} whole nodes{_memory(shape)}" + (" in one rack" if len(racks) == 1 else "")
            reason = f"waiting for {where}; reserved for {fmt(held.time, now)}"
        elif fits_ignoring_reservation(entry):
            if held is not None and now + entry.est > held.time:
                code = "reservation"
                reason = (f"would delay job {held.entry.id}, reserved for {fmt(held.time, now)}, "
                          f"and is expected to run {_duration(entry.est)}")
            else:
                code = "order"
                reason = f"behind {_plural(behind, 'earlier job')} (strict arrival order, no backfill)"
        else:
            code = "capacity"
            if shape.nodes == 1:
                reason = f"no active node has {_plural(shape.gpus, 'GPU')}{_memory(shape)} free"
            else:
                reason = f"waiting for {shape.nodes} whole nodes with {shape.per_node} GPUs{_memory(shape)} free"
            if behind:
                if wfq and key[0] == 0:
                    what = "that waited longer"
                elif wfq:
                    what = "of higher fair-share priority"
                else:
                    what = "submitted earlier"
                reason += f"; behind {_plural(behind, 'job')} {what}"
        if key[0] == 0 and wfq:
            reason += f"; queued over {_duration(config.aging_s)}, so it goes before newer jobs"
        decision.pending[entry.id] = Pending(
            position=position, flow=sched.flows[(entry.team, entry.kind)].label,
            start_tag=start, finish_tag=finish, reason=reason, code=code,
        )
