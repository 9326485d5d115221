"""Teams' standing: fair-share level, month usage, committed usage, quotas.

A team's *level* is its decayed past usage per unit of weight, in the units of WFQ tags
(GPU-seconds / weight). Each GPU-second it used counts 2^(-age / half-life), so a team that just used
the cluster heavily yields to one that did not, and is forgiven over a few half-lives. The pass adds
the level to the finish tags of the team's jobs.

Committed usage (GPU-seconds its running jobs are still expected to use) only serves the monthly
quota: a job may start if used + committed + its own estimate fits in the month's GPU-hours.
"""
from __future__ import annotations

import math
from collections.abc import Hashable, Iterable
from heapq import heappop, heappush


def decay(half_life_s: float, elapsed_s: float) -> float:
    if half_life_s <= 0:
        return 0.0
    return math.exp(-math.log(2) * max(0.0, elapsed_s) / half_life_s)


def decayed_usage(intervals: Iterable[tuple[float, float | None, int]], now: float, half_life_s: float) -> float:
    """Decayed GPU-seconds of (start, end or None while running, GPUs) intervals, as seen at `now`.

    Each GPU-second counts 2^(-age / half_life). The live dispatcher computes TeamSpec.decayed_usage
    with this from a team's allocations.
    """
    if half_life_s <= 0:
        return 0.0
    rate = math.log(2) / half_life_s
    total = 0.0
    for start, end, gpus in intervals:
        end = now if end is None else min(end, now)
        if end <= start:
            continue
        # Integral of gpus * exp(-rate * (now - t)) dt from start to end.
        total += gpus * (math.exp(-rate * (now - end)) - math.exp(-rate * (now - start))) / rate
    return total


class TeamBook:
    """One team's usage, kept incrementally as its jobs start and end."""

    __slots__ = (
        "_committed",
        "_ends",
        "_sum_g",
        "_sum_g_end",
        "decayed",
        "gpus_in_use",
        "half_life",
        "id",
        "max_gpus",
        "max_gpus_per_job",
        "month_quota_s",
        "month_used_s",
        "month_used_t",
        "name",
        "t_ref",
        "weight",
    )

    def __init__(
        self,
        team_id: Hashable,
        name: str,
        weight: float,
        half_life_s: float,
        now: float,
        *,
        max_gpus: int | None = None,
        gpu_hours_per_month: float | None = None,
        max_gpus_per_job: int | None = None,
        month_used_s: float = 0.0,
        decayed: float = 0.0,
    ):
        self.id = team_id
        self.name = name
        self.weight = max(float(weight), 1e-9)
        self.half_life = half_life_s
        self.max_gpus = max_gpus
        self.max_gpus_per_job = max_gpus_per_job
        self.month_quota_s = None if gpu_hours_per_month is None else gpu_hours_per_month * 3600.0
        self.month_used_s = month_used_s
        self.month_used_t = now
        self.decayed = decayed
        self.t_ref = now
        self.gpus_in_use = 0
        # Committed usage: sum over running jobs, whose estimated end is still ahead, of
        # gpus * (end - now) = sum_g_end - sum_g * now; jobs leave it when they end or overrun.
        self._sum_g_end = 0.0
        self._sum_g = 0
        self._committed: dict[Hashable, tuple[int, float]] = {}
        self._ends: list[tuple[float, Hashable]] = []

    # Past usage accrues at gpus_in_use GPU-seconds per second and decays; both are advanced lazily.
    def _advance(self, now: float) -> None:
        elapsed = now - self.t_ref
        if elapsed <= 0:
            return
        if self.half_life > 0:
            factor = decay(self.half_life, elapsed)
            self.decayed = self.decayed * factor + self.gpus_in_use * self.half_life / math.log(2) * (1 - factor)
        self.month_used_s += self.gpus_in_use * (now - self.month_used_t)
        self.month_used_t = now
        self.t_ref = now

    def month_used(self, now: float) -> float:
        return self.month_used_s + self.gpus_in_use * max(0.0, now - self.month_used_t)

    def committed(self, now: float) -> float:
        ends = self._ends
        while ends and ends[0][0] <= now:
            _, job_id = heappop(ends)
            entry = self._committed.pop(job_id, None)
            if entry is not None:
                self._sum_g -= entry[0]
                self._sum_g_end -= entry[0] * entry[1]
        if not self._committed:
            self._sum_g, self._sum_g_end = 0, 0.0  # no float drift once empty
            return 0.0
        return max(0.0, self._sum_g_end - self._sum_g * now)

    def level(self, now: float) -> float:
        """Decayed past usage per unit of weight, in the units of WFQ tags."""
        self._advance(now)
        return self.decayed / self.weight

    def start(self, job_id: Hashable, gpus: int, now: float, est_end: float) -> None:
        self._advance(now)
        self.gpus_in_use += gpus
        if est_end > now:
            self._committed[job_id] = (gpus, est_end)
            self._sum_g += gpus
            self._sum_g_end += gpus * est_end
            heappush(self._ends, (est_end, job_id))

    def end(self, job_id: Hashable, gpus: int, now: float) -> None:
        self._advance(now)
        self.gpus_in_use -= gpus
        entry = self._committed.pop(job_id, None)
        if entry is not None:
            self._sum_g -= entry[0]
            self._sum_g_end -= entry[0] * entry[1]

    def quota_block(self, gpus: int, est_s: float, now: float) -> str | None:
        """Why the team's quotas stop a job of this size now (None: they don't)."""
        if self.max_gpus_per_job is not None and gpus > self.max_gpus_per_job:
            return "quota_per_job"
        if self.max_gpus is not None and self.gpus_in_use + gpus > self.max_gpus:
            return "max_gpus"
        if self.month_quota_s is not None:
            committed = self.committed(now)
            if self.month_used(now) + committed + gpus * est_s > self.month_quota_s:
                return "month_quota"
        return None
