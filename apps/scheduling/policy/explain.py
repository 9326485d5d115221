"""Why each queued job is still waiting, in words a user can act on, and where it stands."""
from __future__ import annotations

import time as _time
from collections.abc import Callable
from heapq import heapify, heappop, heappush
from typing import TYPE_CHECKING

from .queue import served_slowdown
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
    """'14:20 UTC (in 2 h 05 min)' for epoch times; '2 h 05 min from now' on a replay's virtual clock."""
    if t >= 1e9:
        stamp = _time.strftime("%H:%M" if t - now < 20 * 3600 else "%d %b %H:%M", _time.gmtime(t))
        return f"{stamp} UTC (in {_duration(t - now)})"
    return f"{_duration(t - now)} from now"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _memory(shape) -> str:
    return f" with {shape.memory_mb / 1024:g} GB" if shape.memory_mb else ""


def ordered(sched: Scheduler, now: float) -> list[tuple[bool, Entry]]:
    """Every queued job as (aged, entry), in the order the next pass would take them: the jobs past
    the aging bound oldest first, then the others by finish tag + fair-share level, then the jobs past
    the preemption mark as the pass merges their sub-queues (the pass's Scheduler.order_key, for the
    whole queue at once)."""
    config = sched.config
    queued = list(sched.queued.values())  # in arrival order, which the stable sort keeps on ties
    if config.policy != "wfq":
        return [(False, e) for e in queued]
    aged_before = now - config.aging_s
    levels = {team: book.level(now) * config.fair_share_weight for team, book in sched.teams.items()}
    aged = [(True, e) for e in queued if e.submit <= aged_before and not e.served]
    rest = [e for e in queued if e.submit > aged_before and not e.served]
    served = [e for e in queued if e.served]
    rest.sort(key=lambda e: e.finish_tag + levels[e.team])
    return aged + [(False, e) for e in rest] + [(False, e) for e in _merged(sched, served, now)]


def _merged(sched: Scheduler, served: list[Entry], now: float) -> list[Entry]:
    """The served jobs as the pass takes them: each sub-queue (flow x shape) in its own order, and at
    each step the sub-queue whose head comes first by Scheduler.order_key (with served_order
    "slowdown" that key changes with the clock, so a global sort would rank a job ahead of an earlier
    one of its sub-queue that the pass must take first)."""
    subs: dict = {}
    for entry in served:
        subs.setdefault(entry.sub, []).append(entry)
    levels: dict = {}
    heap = [(sched.order_key(jobs[0], now, levels), 0, jobs) for jobs in subs.values()]
    heapify(heap)
    out = []
    while heap:
        _, i, jobs = heappop(heap)
        out.append(jobs[i])
        if i + 1 < len(jobs):
            heappush(heap, (sched.order_key(jobs[i + 1], now, levels), i + 1, jobs))
    return out


def _describe(code: str, entry: Entry, book, when: Callable[[float], str], first_hold, now: float) -> str:
    """The text of a reason that depends only on the job's team, shape and estimate, not its place."""
    shape = entry.shape
    if code == "quota_per_job":
        return (f"asks for {_plural(entry.gpus, 'GPU')}; team {book.name} may use at most "
                f"{book.max_gpus_per_job} per job")
    if code == "never_fits":
        if shape.nodes == 1:
            return f"no active node has {_plural(shape.gpus, 'GPU')}{_memory(shape)}"
        return (f"needs {shape.nodes} active nodes with {_plural(shape.per_node, 'GPU')}{_memory(shape)} each; "
                f"the cluster has fewer")
    if code == "max_gpus":
        text = f"team {book.name} is at {book.gpus_in_use}/{book.max_gpus} GPUs"
        return text + (f" and this job needs {entry.gpus}" if book.gpus_in_use < book.max_gpus else "")
    if code == "month_quota":
        used = (book.month_used(now) + book.committed(now)) / 3600
        return (f"over the monthly GPU-hour quota: team {book.name} has used or committed {used:.0f} of "
                f"{book.month_quota_s / 3600:.0f} GPU-hours and this job needs about "
                f"{entry.gpus * entry.est / 3600:.0f}")
    if code == "reservation":
        return (f"would delay job {first_hold.entry.id}, reserved for {when(first_hold.time)}; "
                f"this job is expected to run {_duration(entry.est)}")
    # capacity
    if shape.nodes == 1:
        return f"no active node has {_plural(shape.gpus, 'GPU')}{_memory(shape)} free"
    return f"waiting for {shape.nodes} whole nodes with {shape.per_node} GPUs{_memory(shape)} free"


def explain_pass(sched: Scheduler, decision: Decision, now: float,
                 format_time: Callable[[float, float], str] | None = None) -> None:
    """Fill decision.pending: position, flow, tags, reason and reason code of every queued job.

    The jobs of one sub-queue (same team, kind and shape) share most of their reason, so it is
    worked out once per sub-queue; what depends on a job's estimate or place is added per job."""
    fmt = format_time or default_format_time
    times: dict[float, str] = {}

    def when(t: float) -> str:
        if t not in times:
            times[t] = fmt(t, now)
        return times[t]

    cluster, config = sched.cluster, sched.config
    wfq = config.policy == "wfq"
    holds = {held.entry.id: held for held in sched.reservations}
    first_hold = min(sched.reservations, key=lambda h: h.time, default=None)
    texts: dict[tuple, str] = {}
    aged_note = f"; queued over {_duration(config.aging_s)}, so it goes before newer jobs"
    mark = f"{config.preempt_threshold_gpu_s / 3600:g} GPU-hours"
    pending = decision.pending

    def text(case: tuple, code: str, entry: Entry) -> str:
        found = texts.get(case)
        if found is None:
            found = texts[case] = _describe(code, entry, sched.teams[entry.team], when, first_hold, now)
        return found

    per_sub: dict = {}
    month_blocks: dict[tuple, bool] = {}
    # The free GPUs of nodes held for jobs that preempt are theirs: a job that would fit only there
    # does not fit now. They stay hidden while explaining, as the pass had them.
    cluster.hide(sched.preempt_nodes)
    try:
        for position, (aged, entry) in enumerate(ordered(sched, now), start=1):
            sub = entry.sub
            static = per_sub.get(sub)
            if static is None:
                # (code, text) when the whole sub-queue waits for the same thing, else (None, fits now).
                book = sched.teams[entry.team]
                block = book.quota_block(entry.gpus, 0.0, now)
                if block in ("quota_per_job", "max_gpus"):
                    static = (block, _describe(block, entry, book, when, first_hold, now))
                elif not sched.can_ever(entry.shape):
                    static = ("never_fits", _describe("never_fits", entry, book, when, first_hold, now))
                else:
                    static = (None, cluster.place(entry.shape) is not None)
                per_sub[sub] = static
            code, detail = static
            if code is not None:
                reason = detail
            else:
                book = sched.teams[entry.team]
                over_month = False
                if book.month_quota_s is not None:
                    month_key = (entry.team, entry.gpus, entry.est)
                    if month_key not in month_blocks:
                        month_blocks[month_key] = book.quota_block(entry.gpus, entry.est, now) == "month_quota"
                    over_month = month_blocks[month_key]
                if over_month:
                    code, reason = "month_quota", text(("month_quota", sub, entry.est), "month_quota", entry)
                elif entry.id in holds:
                    code, reason = "reserved", _reserved(entry, holds[entry.id], cluster, when)
                elif detail and first_hold is not None and now + entry.est > first_hold.time:
                    code, reason = "reservation", text(("reservation", entry.est), "reservation", entry)
                elif detail:
                    code = "order"
                    if wfq:  # it would fit, but the first job of its team, kind and shape waits
                        reason = (f"behind {_plural(position - 1, 'job')}; an earlier job of its team, kind and size "
                                  f"waits, and those start in order")
                    else:
                        reason = f"behind {_plural(position - 1, 'earlier job')} (strict arrival order, no backfill)"
                else:
                    code, reason = "capacity", text(("capacity", entry.shape.key), "capacity", entry)
                    if position > 1:
                        if not wfq:
                            what = "submitted earlier"
                        else:
                            what = "that waited longer" if aged else "of higher fair-share priority"
                        jobs = "1 job" if position == 2 else f"{position - 1} jobs"
                        reason = f"{reason}; behind {jobs} {what}"
            stopping = sched.preempting.get(entry.id)
            if stopping is not None:
                code = "preempting"
                # The stopped jobs may be other teams': counted, not named.
                reason = (f"stopping {_plural(len(stopping), 'running job')} that ran past {mark} to make room; it "
                          f"starts when {'that job has' if len(stopping) == 1 else 'they have'} given the GPUs back")
            if aged:
                reason += aged_note
            if entry.served:
                ran = entry.job.ran_s * entry.gpus / 3600
                reason += (f"; it has run {ran:.1f} GPU-hours already, past the preemption mark of {mark}, "
                           f"so jobs that have run less go first")
                if sched.config.served_order == "slowdown":
                    reason += (f"; among jobs past the mark, the one that has waited longest compared to its run "
                               f"goes first (this one would end at {served_slowdown(entry, now):.1f}x its run time)")
            pending[entry.id] = Pending(position, sub.flow.label, entry.start_tag, entry.finish_tag, reason, code)
    finally:
        cluster.unhide()


def _reserved(entry: Entry, held, cluster, when: Callable[[float], str]) -> str:
    shape = entry.shape
    if shape.nodes == 1:
        where = f"{_plural(shape.gpus, 'GPU')}{_memory(shape)} on one node"
    else:
        one_rack = len({cluster.rack[n] for n, _ in held.nodes}) == 1
        where = f"{shape.nodes} whole nodes{_memory(shape)}" + (" in one rack" if one_rack else "")
    return f"waiting for {where}; reserved for {when(held.time)}"
