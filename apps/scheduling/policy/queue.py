"""The queue as WFQ sees it: flows (team x kind), each split by job shape into FIFO sub-queues.

A job's virtual finish tag is its team's level (see fairshare.py) plus the tag increments
(cost / weight) of the jobs of its flow queued up to and including it; its start tag leaves its own
increment out. Within a flow the tags grow with arrival, so each sub-queue is already in tag order
and a pass only ever looks at sub-queue heads: merging them with a heap gives the whole queue in tag
order, and a head that cannot be placed blocks its whole sub-queue for the rest of the pass (the jobs
behind it have the same shape), which is what keeps a pass cheap however long the queue is.
"""
from __future__ import annotations

from bisect import bisect_right
from collections.abc import Hashable

from .cluster import Shape


class Entry:
    __slots__ = ("est", "gpus", "id", "inc", "job", "kind", "priority", "seq", "shape", "sub", "submit", "team")

    def __init__(self, job, seq: int, shape: Shape, est: float, inc: float):
        self.job = job
        self.id = job.id
        self.team = job.team
        self.kind = job.kind
        self.priority = job.priority
        self.gpus = job.gpus
        self.submit = job.submit
        self.seq = seq
        self.shape = shape
        self.est = est
        self.inc = inc
        self.sub: SubQueue | None = None


class SubQueue:
    """The jobs of one flow with one shape, in arrival order; only the head ever leaves."""

    __slots__ = ("cum", "flow", "head", "jobs", "seqs", "shape")

    def __init__(self, flow: Flow, shape: Shape):
        self.flow = flow
        self.shape = shape
        self.jobs: list[Entry] = []
        self.seqs: list[int] = []
        self.cum: list[float] = [0.0]  # cum[i] = sum of increments of jobs[:i]
        self.head = 0

    def __len__(self) -> int:
        return len(self.jobs) - self.head

    def push(self, entry: Entry) -> None:
        entry.sub = self
        self.jobs.append(entry)
        self.seqs.append(entry.seq)
        self.cum.append(self.cum[-1] + entry.inc)

    def peek(self) -> Entry:
        return self.jobs[self.head]

    def pop(self) -> Entry:
        entry = self.jobs[self.head]
        self.head += 1
        if self.head > 1024 and self.head * 2 > len(self.jobs):
            # Drop the long-gone prefix so memory follows the queue, not the history.
            cut = self.head
            offset = self.cum[cut]
            self.jobs = self.jobs[cut:]
            self.seqs = self.seqs[cut:]
            self.cum = [c - offset for c in self.cum[cut:]]
            self.head = 0
        return entry

    def queued_upto(self, seq: int) -> float:
        """Sum of increments of this sub-queue's queued jobs that arrived at or before `seq`."""
        i = bisect_right(self.seqs, seq, self.head)
        return self.cum[i] - self.cum[self.head] if i > self.head else 0.0


class Flow:
    __slots__ = ("kind", "label", "subs", "team")

    def __init__(self, team: Hashable, kind: str, label: str):
        self.team = team
        self.kind = kind
        self.label = label
        self.subs: dict[tuple, SubQueue] = {}

    def ahead(self, entry: Entry) -> float:
        """The entry's finish tag minus its team's level: increments of its flow queued up to it."""
        seq = entry.seq
        total = 0.0
        for sub in self.subs.values():
            if sub.head < len(sub.jobs):
                total += sub.queued_upto(seq)
        return total
