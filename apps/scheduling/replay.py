"""Replay a job trace through the policy core on a virtual clock, and measure waits and fairness.

Event-driven: the clock jumps from one submit or end to the next, and after each instant's events
the core makes one pass, as the live dispatcher does on submit and on job end. The core sees run
times only as the estimator learns them from jobs that have ended; the true duration of a job is
used for nothing but scheduling its end event.
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


def simulate(jobs: list[TraceJob], config: PolicyConfig, nodes: int, gpus_per_node: int, racks: int = 1,
             weights: dict[str, float] | None = None, scheduler_class: type[Scheduler] = Scheduler) -> list[float]:
    """Run the trace; return each job's start time (index-aligned with `jobs`). `scheduler_class` lets a
    study change one method of the core (bench/scheduler_fairness_probe.py); the product uses Scheduler."""
    sched, estimator = trace_scheduler(jobs, config, nodes, gpus_per_node, racks, weights, scheduler_class)
    starts = [math.nan] * len(jobs)
    ends: list[tuple[float, int]] = []
    total = len(jobs)
    i = 0
    enqueue = sched.enqueue
    schedule_pass = sched.schedule_pass
    finish = sched.finish
    observe = estimator.observe
    while i < total or ends:
        now = jobs[i].submit if i < total else math.inf
        if ends and ends[0][0] <= now:
            now = ends[0][0]
        while ends and ends[0][0] <= now:
            _, k = heappop(ends)
            job = jobs[k]
            finish(k, now)
            observe(job.tenant, job.kind, job.gpus, job.duration)
        while i < total and jobs[i].submit <= now:
            job = jobs[i]
            enqueue(QueuedJob(
                id=i, team=job.tenant, kind=job.kind, gpus=job.gpus, submit=job.submit, priority=job.priority,
                nodes=-(-job.gpus // gpus_per_node),
            ))
            i += 1
        for k in schedule_pass(now).placements:
            starts[k] = now
            heappush(ends, (now + jobs[k].duration, k))
    return starts


def metrics(jobs: list[TraceJob], starts: list[float], capacity: int) -> dict:
    waits, slowdowns = [], []
    per_tenant: dict[str, dict] = {}
    gpu_seconds = 0.0
    first_submit = min((j.submit for j in jobs), default=0.0)
    last_end = first_submit
    jct_sum = 0.0
    for job, start in zip(jobs, starts, strict=True):
        wait = start - job.submit
        end = start + job.duration
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
           weights: str | Path | None = None, config: PolicyConfig | None = None) -> dict:
    """Load, simulate and measure; the dict has exactly the fields `replay_trace --json` prints."""
    began = time.perf_counter()
    if nodes < 1 or gpus_per_node < 1:
        raise TraceError("--nodes and --gpus-per-node must be at least 1")
    jobs = load_trace(trace)
    tenant_weights = load_weights(weights) if weights else {}
    if config is None:
        config = PolicyConfig(policy=policy)
    elif config.policy != policy:
        from dataclasses import replace

        config = replace(config, policy=policy)
    starts = simulate(jobs, config, nodes, gpus_per_node, racks, tenant_weights)
    result = metrics(jobs, starts, nodes * gpus_per_node)
    result["wall_s"] = round(time.perf_counter() - began, 3)
    return result
