"""Replay a job trace through the policy core on a virtual clock, and measure waits and fairness.

Event-driven: the clock jumps from one submit or end to the next, and after each instant's events
the core makes one pass, as the live dispatcher does on submit and on job end. The core sees run
times only as the estimator learns them from jobs that have ended; the true duration of a job is
used for nothing but scheduling its end event.

Preemption (on by default in wfq, PolicyConfig.preemption): a job the core preempts stops at once,
keeps what it has run (a checkpoint) and goes back to the queue; when it starts again it pays
`restart_s` (default 30 s: stopping at a step boundary with a checkpoint, relaunching, reloading it and
warming up; bench/restart_cost.py measured 10-16 s for the catalog's training models on an H200,
3 s for the digits MLP on a CPU, so the default is twice the largest) before it makes progress again.
A job's wait is therefore all the time from submit to end that it was not making progress: queued
first, queued again after each preemption, and restarting (end - submit - duration; without
preemption this is start - submit).
"""
from __future__ import annotations

import csv
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from heapq import heappop, heappush
from pathlib import Path

from apps.scheduling.policy import PolicyConfig, QueuedJob, RuntimeEstimator, Scheduler, TeamSpec
from apps.scheduling.policy.types import PRIORITIES

REQUIRED = ("submit_s", "duration_s", "num_gpus", "tenant")
SLOWDOWN_BOUND_S = 60.0
JAIN_MIN_JOBS = 10
RESTART_S = 30.0  # see the module doc; until session 8 an assumed 300 s


class TraceError(ValueError):
    """A trace or weights file the replayer cannot use; the message names the row and why."""


@dataclass(frozen=True, slots=True)
class TraceJob:
    row: int
    submit: float
    duration: float
    gpus: int
    tenant: str
    priority: str = "normal"
    kind: str = "training"


def _number(raw: str, column: str, where: str) -> float:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise TraceError(f"{where}: {column} {raw!r} is not a number") from None
    if not math.isfinite(value):
        raise TraceError(f"{where}: {column} {raw!r} is not a finite number")
    return value


def load_trace(path: str | Path) -> list[TraceJob]:
    """Read TRACE columns submit_s,duration_s,num_gpus,tenant (optional priority,kind)."""
    path = Path(path)
    try:
        handle = path.open(newline="")
    except OSError as exc:
        raise TraceError(f"{path}: cannot read it ({exc.strerror})") from None
    jobs = []
    with handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in REQUIRED if c not in columns]
        if missing:
            raise TraceError(f"{path}: row 0 (the header) lacks column{'s' if len(missing) > 1 else ''} "
                             f"{', '.join(missing)}; expected {','.join(REQUIRED)} (optional priority,kind)")
        reader.fieldnames = columns
        for row_number, row in enumerate(reader, start=1):
            where = f"{path}: row {row_number} (line {reader.line_num})"
            if any(row.get(c) in (None, "") for c in REQUIRED):
                empty = [c for c in REQUIRED if row.get(c) in (None, "")]
                raise TraceError(f"{where}: no value for {', '.join(empty)}")
            submit = _number(row["submit_s"], "submit_s", where)
            duration = _number(row["duration_s"], "duration_s", where)
            gpus = _number(row["num_gpus"], "num_gpus", where)
            if duration < 0:
                raise TraceError(f"{where}: duration_s is negative ({row['duration_s']})")
            if gpus <= 0 or gpus != int(gpus):
                raise TraceError(f"{where}: num_gpus must be a whole number of at least 1, not {row['num_gpus']}")
            priority = (row.get("priority") or "normal").strip()
            if priority not in PRIORITIES:
                raise TraceError(f"{where}: priority {priority!r} is not one of {', '.join(PRIORITIES)}")
            kind = (row.get("kind") or "training").strip()
            jobs.append(TraceJob(row_number, submit, duration, int(gpus), row["tenant"].strip(), priority, kind))
    jobs.sort(key=lambda j: j.submit)  # stable: ties keep file order
    return jobs


def load_weights(path: str | Path) -> dict[str, float]:
    path = Path(path)
    try:
        handle = path.open(newline="")
    except OSError as exc:
        raise TraceError(f"{path}: cannot read it ({exc.strerror})") from None
    weights = {}
    with handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in ("tenant", "weight") if c not in columns]
        if missing:
            raise TraceError(f"{path}: row 0 (the header) lacks {', '.join(missing)}; expected tenant,weight")
        reader.fieldnames = columns
        for row_number, row in enumerate(reader, start=1):
            where = f"{path}: row {row_number} (line {reader.line_num})"
            weight = _number(row.get("weight"), "weight", where)
            if weight <= 0:
                raise TraceError(f"{where}: weight must be positive, not {row['weight']}")
            weights[(row.get("tenant") or "").strip()] = weight
    return weights


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not sorted_values:
        return 0.0
    pos = (len(sorted_values) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (pos - low)


def _jain(values: Iterable[float]) -> float:
    values = list(values)
    if not values:
        return 1.0
    square_sum = sum(v * v for v in values)
    return (sum(values) ** 2) / (len(values) * square_sum) if square_sum else 1.0


def trace_scheduler(jobs: list[TraceJob], config: PolicyConfig, nodes: int, gpus_per_node: int, racks: int = 1,
                    weights: dict[str, float] | None = None,
                    scheduler_class: type[Scheduler] = Scheduler) -> tuple[Scheduler, RuntimeEstimator]:
    """The scheduler a replay runs the trace through (and its estimator): `nodes` nodes of `gpus_per_node`
    80 GB GPUs, split evenly over `racks` racks, the tenants' weights. Refuses a job larger than the cluster."""
    capacity = nodes * gpus_per_node
    for job in jobs:
        if job.gpus > capacity:
            raise TraceError(f"row {job.row}: asks for {job.gpus} GPUs; the cluster has {capacity}")
    estimator = RuntimeEstimator(config)
    sched = scheduler_class(config, estimator, now=jobs[0].submit if jobs else 0.0)
    racks = max(1, min(racks, nodes))
    for n in range(nodes):
        sched.cluster.add_node(
            n, f"node-{n}", f"rack-{n * racks // nodes}", True,
            ((n * gpus_per_node + i, i, 81920) for i in range(gpus_per_node)),
        )
    for tenant, weight in (weights or {}).items():
        sched.add_team(TeamSpec(id=tenant, name=tenant, weight=weight))
    return sched, estimator


@dataclass(slots=True)
class Outcome:
    """What a replay did to each job (index-aligned with the trace): first start and end."""

    starts: list[float]
    ends: list[float]
    preemptions: int = 0  # in all
    preempted_jobs: int = 0  # jobs preempted at least once
    runs: list[tuple[int, float, float]] | None = None  # (job, start, stop) of every run, with `record_runs`


def simulate(jobs: list[TraceJob], config: PolicyConfig, nodes: int, gpus_per_node: int, racks: int = 1,
             weights: dict[str, float] | None = None, scheduler_class: type[Scheduler] = Scheduler) -> list[float]:
    """Run the trace; return each job's first start time (index-aligned with `jobs`). `scheduler_class` lets a
    study change one method of the core (bench/scheduler_fairness_probe.py); the product uses Scheduler."""
    return run_trace(jobs, config, nodes, gpus_per_node, racks, weights, scheduler_class).starts


def run_trace(jobs: list[TraceJob], config: PolicyConfig, nodes: int, gpus_per_node: int, racks: int = 1,
              weights: dict[str, float] | None = None, scheduler_class: type[Scheduler] = Scheduler,
              restart_s: float = RESTART_S, record_runs: bool = False) -> Outcome:
    """Run the trace, preempting and requeueing as the core decides."""
    sched, estimator = trace_scheduler(jobs, config, nodes, gpus_per_node, racks, weights, scheduler_class)
    total = len(jobs)
    starts = [math.nan] * total
    done = [math.nan] * total
    # Per job: true run time still to go, seconds run so far, start of the current run, times preempted.
    # An end event whose version is stale belongs to a run that was preempted.
    remaining = [j.duration for j in jobs]
    ran = [0.0] * total
    began = [0.0] * total
    preempted = [0] * total
    version = [0] * total
    ends: list[tuple[float, int, int]] = []
    runs: list[tuple[int, float, float]] | None = [] if record_runs else None
    i = 0
    enqueue = sched.enqueue
    schedule_pass = sched.schedule_pass
    finish = sched.finish
    observe = estimator.observe

    def queued(k: int) -> QueuedJob:
        job = jobs[k]
        return QueuedJob(
            id=k, team=job.tenant, kind=job.kind, gpus=job.gpus, submit=job.submit, priority=job.priority,
            nodes=-(-job.gpus // gpus_per_node), attempt=preempted[k] + 1, ran_s=ran[k], preemptions=preempted[k],
        )

    wake = math.inf  # when a running job becomes preemptible while jobs wait: a pass then
    while i < total or ends:
        now = jobs[i].submit if i < total else math.inf
        if ends and ends[0][0] <= now:
            now = ends[0][0]
        if wake < now:
            now = wake
        while ends and ends[0][0] <= now:
            _, k, v = heappop(ends)
            if v != version[k]:
                continue
            job = jobs[k]
            finish(k, now)
            done[k] = now
            if runs is not None:
                runs.append((k, began[k], now))
            observe(job.tenant, job.kind, job.gpus, job.duration)
        while i < total and jobs[i].submit <= now:
            enqueue(queued(i))
            i += 1
        decision = schedule_pass(now)
        while True:
            for k in decision.placements:
                if math.isnan(starts[k]):
                    starts[k] = now
                began[k] = now
                heappush(ends, (now + remaining[k], k, version[k]))
            if not decision.preemptions:
                break
            # The core has already taken their GPUs back; they wait again, and restart when they resume.
            for k in decision.preemptions:
                run = now - began[k]
                if runs is not None:
                    runs.append((k, began[k], now))
                ran[k] += run
                remaining[k] = max(0.0, remaining[k] - run) + restart_s
                version[k] += 1
                preempted[k] += 1
                enqueue(queued(k))
            decision = schedule_pass(now)
        wake = math.inf
        if sched.preempt and sched.queued:
            at = sched.next_preemptible_at()
            if at is not None and at > now:
                wake = at
    return Outcome(starts, done, sum(preempted), sum(1 for c in preempted if c), runs)


def metrics(jobs: list[TraceJob], starts: list[float], capacity: int, ends: list[float] | None = None) -> dict:
    """The replay's numbers. Without `ends` every job ran start to start + duration; with them a job's
    wait is all the time it was not making progress, end - submit - duration."""
    waits, slowdowns = [], []
    per_tenant: dict[str, dict] = {}
    gpu_seconds = 0.0
    first_submit = min((j.submit for j in jobs), default=0.0)
    last_end = first_submit
    jct_sum = 0.0
    for index, (job, start) in enumerate(zip(jobs, starts, strict=True)):
        if ends is None:
            wait, end = start - job.submit, start + job.duration
        else:
            end = ends[index]
            wait = max(0.0, end - job.submit - job.duration)
        slowdown = max(1.0, (wait + job.duration) / max(job.duration, SLOWDOWN_BOUND_S))
        waits.append(wait)
        slowdowns.append(slowdown)
        jct_sum += end - job.submit
        last_end = max(last_end, end)
        gpu_seconds += job.gpus * job.duration
        tenant = per_tenant.setdefault(job.tenant, {"jobs": 0, "wait": 0.0, "slowdown": 0.0, "gpu_seconds": 0.0})
        tenant["jobs"] += 1
        tenant["wait"] += wait
        tenant["slowdown"] += slowdown
        tenant["gpu_seconds"] += job.gpus * job.duration
    count = len(jobs)
    ordered_waits = sorted(waits)
    makespan = last_end - first_submit
    return {
        "jobs": count,
        "mean_wait_s": round(sum(waits) / count, 1) if count else 0.0,
        "p50_wait_s": round(_percentile(ordered_waits, 50), 1),
        "p95_wait_s": round(_percentile(ordered_waits, 95), 1),
        "p99_wait_s": round(_percentile(ordered_waits, 99), 1),
        "mean_jct_s": round(jct_sum / count, 1) if count else 0.0,
        "mean_bounded_slowdown": round(sum(slowdowns) / count, 4) if count else 0.0,
        "makespan_s": round(makespan, 1),
        "utilization": round(gpu_seconds / (capacity * makespan), 4) if makespan > 0 else 0.0,
        "tenant_slowdown_jain": round(_jain(
            t["slowdown"] / t["jobs"] for t in per_tenant.values() if t["jobs"] >= JAIN_MIN_JOBS
        ), 4),
        "per_tenant": {
            name: {
                "jobs": t["jobs"],
                "mean_wait_s": round(t["wait"] / t["jobs"], 1),
                "mean_bounded_slowdown": round(t["slowdown"] / t["jobs"], 4),
                "gpu_seconds": round(t["gpu_seconds"], 1),
            }
            for name, t in sorted(per_tenant.items())
        },
    }


def replay(trace: str | Path, policy: str, nodes: int, gpus_per_node: int, racks: int = 1,
           weights: str | Path | None = None, config: PolicyConfig | None = None,
           restart_s: float = RESTART_S) -> dict:
    """Load, simulate and measure; the dict has exactly the fields `replay_trace --json` prints."""
    began = time.perf_counter()
    if nodes < 1 or gpus_per_node < 1:
        raise TraceError("--nodes and --gpus-per-node must be at least 1")
    jobs = load_trace(trace)
    # A job larger than the whole cluster could never start: it is rejected, as the live API rejects it
    # at submit, and left out of the replay and of every metric (the output says how many and which rows).
    capacity = nodes * gpus_per_node
    rejected = [j for j in jobs if j.gpus > capacity]
    if rejected:
        jobs = [j for j in jobs if j.gpus <= capacity]
        if not jobs:
            raise TraceError(f"every job asks for more GPUs than the cluster's {capacity} (row {rejected[0].row}: "
                             f"{rejected[0].gpus})")
    tenant_weights = load_weights(weights) if weights else {}
    if config is None:
        config = PolicyConfig(policy=policy)
    elif config.policy != policy:
        from dataclasses import replace

        config = replace(config, policy=policy)
    if restart_s < 0 or not math.isfinite(restart_s):
        raise TraceError(f"--restart-s must be a finite number of seconds >= 0, not {restart_s}")
    outcome = run_trace(jobs, config, nodes, gpus_per_node, racks, tenant_weights, restart_s=restart_s)
    result = metrics(jobs, outcome.starts, nodes * gpus_per_node, outcome.ends)
    result["preemptions"] = outcome.preemptions
    result["preempted_jobs"] = outcome.preempted_jobs
    result["rejected_jobs"] = len(rejected)
    if rejected:
        result["rejected"] = {"reason": f"asks for more GPUs than the cluster's {capacity}",
                              "rows": [j.row for j in rejected[:20]]}
    result["wall_s"] = round(time.perf_counter() - began, 3)
    return result
