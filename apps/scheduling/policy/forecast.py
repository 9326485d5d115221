"""Queue ETAs: play the current queue forward with the same core, jobs ending when estimated."""
from __future__ import annotations

from collections.abc import Hashable
from heapq import heappop, heappush

from .engine import Scheduler
from .estimator import RuntimeEstimator
from .types import PolicyConfig, Snapshot


def forecast_etas(snapshot: Snapshot, estimator: RuntimeEstimator | None = None,
                  config: PolicyConfig | None = None) -> dict[Hashable, float | None]:
    """When each queued job should start if nothing new arrives and every job runs its estimate.

    None for a job that would not start at all (a quota it is over, a shape no active node has).
    A running job past its estimate is assumed to end `overrun_grace_s` from now.
    """
    config = config or PolicyConfig()
    sched = Scheduler.from_snapshot(snapshot, estimator, config)
    now = snapshot.now
    grace = config.overrun_grace_s
    ends: list[tuple[float, int, Hashable]] = []
    order = 0
    for job_id, (_, _, est_end) in sched.running.items():
        heappush(ends, (est_end if est_end > now else now + grace, order, job_id))
        order += 1
    etas: dict[Hashable, float | None] = {}
    while sched.queued:
        decision = sched.schedule_pass(now)
        for job_id in decision.placements:
            etas[job_id] = now
            est_end = sched.running[job_id][2]
            heappush(ends, (max(est_end, now), order, job_id))
            order += 1
        if not sched.queued or not ends:
            break
        now = max(now, ends[0][0])
        while ends and ends[0][0] <= now:
            _, _, job_id = heappop(ends)
            sched.finish(job_id, now)
    for job_id in sched.queued:
        etas[job_id] = None
    return etas
