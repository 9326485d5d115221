"""The queue as WFQ sees it: flows (team x kind), each split by job shape into FIFO sub-queues.

Within a flow the WFQ tags grow with arrival (each job starts where the previous one finished), so
each sub-queue is already in tag order and a pass only ever looks at sub-queue heads: merging them
with a heap gives the queue in order, and a head that cannot be placed blocks its whole sub-queue
for the rest of the pass (the jobs behind it have the same shape), which is what keeps a pass cheap
however long the queue is.
"""
from __future__ import annotations

from collections.abc import Hashable

from .cluster import Shape


class Entry:
    """A queued job as the pass sees it: its shape, estimate and WFQ tags."""

    __slots__ = ("est", "finish_tag", "gpus", "id", "inc", "job", "seq", "served", "shape", "start_tag", "sub",
                 "submit", "team")

    def __init__(self, job, seq: int, shape: Shape, est: float, inc: float, start_tag: float):
        self.id = job.id
        self.team = job.team
        self.gpus = job.gpus
        self.submit = job.submit
        self.seq = seq
        self.shape = shape
        self.est = est
        self.inc = inc
        self.start_tag = start_tag
        self.finish_tag = start_tag + inc
        self.sub: SubQueue | None = None
        self.job = job  # the QueuedJob, to requeue it the same way after a preemption
        # Past the preemption mark (it has run that many GPU-seconds in earlier attempts): goes after
        # every job that has not, in a sub-queue of its own.
        self.served = False


class SubQueue:
    """The jobs of one flow with one shape, in arrival order; only the head ever leaves."""

    __slots__ = ("flow", "head", "jobs", "shape")

    def __init__(self, flow: Flow, shape: Shape):
        self.flow = flow
        self.shape = shape
        self.jobs: list[Entry] = []
        self.head = 0

    def pop(self) -> Entry:
        entry = self.jobs[self.head]
        self.head += 1
        if self.head > 1024 and self.head * 2 > len(self.jobs):
            # Drop the long-gone prefix, so that memory follows the queue, not the history.
            self.jobs = self.jobs[self.head:]
            self.head = 0
        return entry


class Flow:
    __slots__ = ("kind", "label", "last_finish", "subs", "team")

    def __init__(self, team: Hashable, kind: str, label: str):
        self.team = team
        self.kind = kind
        self.label = label
        self.subs: dict[tuple, SubQueue] = {}
        self.last_finish = 0.0  # finish tag of the flow's latest job


def served_slowdown(entry: Entry, now: float) -> float:
    """The bounded slowdown a job past the preemption mark would end with if it started now: its time
    since submit plus the run it has left, over its whole expected run. Jobs past the mark wait behind
    every fresh job, and without this the same fair-share order that made them yield kept the
    over-share teams' long jobs waiting for days (docs/scheduler.md, "The order among served jobs")."""
    left = entry.est
    return (now - entry.submit + left) / max(60.0, entry.job.ran_s + left)
