"""Replay a job trace with the autoscaler in the loop: node-hours it saves, wait it adds.

The same scheduler core and event loop as `apps.scheduling.replay.simulate` (submits and ends on a
virtual clock, one pass after each instant), plus a decision every `decision_interval_s`:

1. the mean of the allocated GPUs over the interval just ended joins a series at that step (the
   live roll-up writes the same quantity, only per minute);
2. the load: `forecast` mode asks the forecaster for the next `horizon_s` and takes the highest
   value of its path; `reactive` mode takes the allocated GPUs of this instant;
3. `autoscaler.plan` decides; a node put on standby takes no new job (it must be idle: the replay
   raises if the rule ever picks a busy one), a node brought back takes jobs after
   `provisioning_delay_s` and is paid for from the decision on.

`off` mode is the baseline: every node active all the time, and exactly `replay.simulate`'s result with
preemption off (`PolicyConfig.preemption`; this study runs jobs start to end).
Node-hours are the hours nodes are active or coming back; they are counted over the submit window
(first to last submit) and over the whole run (first submit to the last job's end).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from heapq import heappop, heappush
from typing import Protocol

import numpy as np
import pandas as pd

from apps.scheduling.policy import PolicyConfig, QueuedJob
from apps.scheduling.replay import TraceJob, _percentile, metrics, trace_scheduler

from .autoscaler import AutoscalerConfig, NodeView, plan

MODES = ("off", "reactive", "forecast")
# Virtual second 0 of a trace is put at this instant, so that the forecaster sees calendar time
# (its daily and weekly seasonality). The Philly trace does not say its weekday; any fixed date will do.
EPOCH = pd.Timestamp("2017-09-01")


class ForecastPathLike(Protocol):
    yhat: Sequence[float]
    upper: Sequence[float]


class Forecaster(Protocol):
    """`history`: means over each step, labelled by the step's start; `latest`: the value at the end
    of each step (what the live roll-up's last minute would say)."""

    def update(self, history: pd.Series, latest: pd.Series | None = None,
               horizons: Sequence[pd.Timedelta] | None = None) -> bool: ...

    def forecast(self, history: pd.Series, horizons: Sequence[pd.Timedelta],
                 latest: pd.Series | None = None) -> ForecastPathLike: ...


@dataclass(slots=True)
class PersistencePath:
    yhat: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    method: str = "persistence"


class PersistenceForecaster:
    """The next values equal the last one. The floor any forecaster has to beat, and a stand-in."""

    def __init__(self, step: pd.Timedelta, **_options: object):
        self.step = step

    def update(self, history: pd.Series, latest: pd.Series | None = None,
               horizons: Sequence[pd.Timedelta] | None = None) -> bool:
        return False

    def forecast(self, history: pd.Series, horizons: Sequence[pd.Timedelta],
                 latest: pd.Series | None = None) -> PersistencePath:
        last = float(history.iloc[-1]) if len(history) else 0.0
        values = np.full(len(horizons), last)
        return PersistencePath(values, values.copy(), values.copy())


def default_forecaster(step: pd.Timedelta) -> Forecaster:
    """The project's forecaster (Prophet plus a correction of its recent error), refit daily."""
    try:
        from .forecaster import LoadForecaster
    except ImportError:  # not written yet on this tree: the floor forecaster, said so in the result
        return PersistenceForecaster(step)
    return LoadForecaster(step, refit_every=pd.Timedelta("1D"))


@dataclass(frozen=True, slots=True)
class ReplayOptions:
    mode: str = "forecast"
    decision_interval_s: float = 300.0
    horizon_s: float = 600.0
    provisioning_delay_s: float = 0.0
    # Which line of the forecast path is the load: its central value, or the top of its 80 % band
    # (more nodes kept, less wait).
    signal: str = "yhat"
    autoscaler: AutoscalerConfig = field(default_factory=AutoscalerConfig)
    # How many steps of history the forecaster is given (None: all); it bounds the cost of a step.
    history_steps: int | None = 28 * 288
    forecaster: Callable[[pd.Timedelta], Forecaster] | None = None  # None: default_forecaster

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.decision_interval_s <= 0 or self.horizon_s < self.decision_interval_s:
            raise ValueError("need decision_interval_s > 0 and horizon_s >= decision_interval_s")
        if self.provisioning_delay_s < 0:
            raise ValueError("provisioning_delay_s must not be negative")
        if self.signal not in ("yhat", "upper"):
            raise ValueError(f"signal must be yhat or upper, not {self.signal!r}")


@dataclass
class AutoscaleRun:
    starts: list[float]
    end: float  # when the last job ended
    # (time, nodes paid for) at every change, from the first submit: active plus coming back.
    paid: list[tuple[float, int]]
    scale_ups: int = 0
    nodes_activated: int = 0
    scale_downs: int = 0
    decisions: int = 0
    floor_scale_ups: int = 0  # scale-ups that only the queue's floor (min_capacity) asked for
    forecast_method: str = ""
    forecast_s: float = 0.0  # wall time spent in update + forecast
    fit_s: float = 0.0  # of which fitting Prophet (as the forecaster counts it)
    refits: int = 0
    # Per decision: the load the rule was given and the highest interval mean that followed within
    # the horizon (what it should have been), to score the forecast.
    predicted: list[float] = field(default_factory=list)
    realized: list[float] = field(default_factory=list)


def node_seconds(paid: list[tuple[float, int]], start: float, stop: float) -> float:
    """The integral of the paid-for node count over [start, stop]."""
    total = 0.0
    for (t, count), (t_next, _) in zip(paid, [*paid[1:], (math.inf, 0)], strict=True):
        low, high = max(t, start), min(t_next, stop)
        if high > low:
            total += count * (high - low)
    return total


def simulate_autoscaled(jobs: list[TraceJob], config: PolicyConfig, nodes: int, gpus_per_node: int,
                        options: ReplayOptions, racks: int = 1,
                        weights: dict[str, float] | None = None) -> AutoscaleRun:
    # This study measures node-hours against added wait with jobs running start to end: preemption is
    # off here (a node is put on standby only when idle, and a preempted job would make it so early).
    config = replace(config, preemption=False)
    sched, estimator = trace_scheduler(jobs, config, nodes, gpus_per_node, racks, weights)
    cluster = sched.cluster
    t0 = sched.now

    scaling = options.mode != "off"
    interval = options.decision_interval_s
    step = pd.Timedelta(seconds=interval)
    steps_ahead = math.ceil(options.horizon_s / interval)
    horizons = [step * (k + 1) for k in range(steps_ahead)]
    forecaster: Forecaster | None = None
    if options.mode == "forecast":
        forecaster = (options.forecaster or default_forecaster)(step)
    run = AutoscaleRun(starts=[math.nan] * len(jobs), end=t0, paid=[(t0, nodes)])
    run.forecast_method = {"off": "", "reactive": "current allocated GPUs"}.get(options.mode, "")

    # A node is "up" (takes jobs), "coming" (paid for, takes jobs at its ready time) or "standby".
    state = ["up"] * nodes
    name_to_node = {f"node-{n}": n for n in range(nodes)}
    ready: list[tuple[float, int]] = []
    paid_count = nodes
    allocated = 0
    area = 0.0  # integral of allocated GPUs since t0
    area_at_tick = 0.0
    last_t = t0
    # The series the forecaster sees, in buffers that double when full (a view per decision, no copy).
    means = np.empty(1024)
    instants = np.empty(1024)
    count = 0
    index = pd.date_range(EPOCH + pd.Timedelta(seconds=t0), periods=len(means), freq=step)
    low_since: float | None = None
    last_change: float | None = None
    next_tick = t0 + interval

    starts = run.starts
    ends: list[tuple[float, int]] = []
    total = len(jobs)
    i = 0

    def advance(now: float) -> None:
        nonlocal area, last_t
        area += allocated * (now - last_t)
        last_t = now

    def set_up(n: int, up: bool) -> None:
        cluster.set_active(n, up)
        # Which shapes can ever fit depends on the active nodes, and the scheduler caches it.
        sched._ever.clear()

    def place(now: float) -> None:
        nonlocal allocated
        for k in sched.schedule_pass(now).placements:
            starts[k] = now
            allocated += jobs[k].gpus
            heappush(ends, (now + jobs[k].duration, k))

    def floor_gpus() -> int:
        need = 0
        for sub in sched.active_subs:
            if sub.head < len(sub.jobs):
                shape = sub.shape
                need = max(need, shape.gpus if shape.nodes == 1 else shape.nodes * gpus_per_node)
        return need

    def decide(now: float) -> None:
        nonlocal area_at_tick, low_since, last_change, paid_count, means, instants, index, count
        if count == len(means):
            means, instants = np.resize(means, 2 * count), np.resize(instants, 2 * count)
            index = pd.date_range(index[0], periods=2 * count, freq=step)
        means[count], instants[count] = (area - area_at_tick) / interval, allocated
        count += 1
        area_at_tick = area
        run.decisions += 1
        if forecaster is not None:
            began = time.perf_counter()
            first = 0 if options.history_steps is None else max(0, count - options.history_steps)
            series = pd.Series(means[first:count], index=index[first:count], copy=False)
            latest = pd.Series(instants[first:count], index=index[first:count], copy=False)
            run.refits += bool(forecaster.update(series, latest, horizons))
            path = forecaster.forecast(series, horizons, latest)
            run.forecast_s += time.perf_counter() - began
            run.forecast_method = str(getattr(path, "method", type(forecaster).__name__))
            load = max(0.0, float(np.max(path.upper if options.signal == "upper" else path.yhat)))
        else:
            load = float(allocated)
        run.predicted.append(load)
        views = [NodeView(f"node-{n}", gpus_per_node, "standby" if state[n] == "standby" else "active",
                          state[n] == "coming" or cluster.free_count[n] < gpus_per_node) for n in range(nodes)]
        floor = floor_gpus()
        decision = plan(views, load, now, low_since=low_since, last_change_at=last_change,
                        config=options.autoscaler, min_capacity=floor)
        low_since = decision.low_since
        if decision.action is None:
            return
        last_change = now
        if decision.action == "standby":
            for name in decision.nodes:
                n = name_to_node[name]
                if state[n] != "up" or cluster.free_count[n] != gpus_per_node:
                    raise RuntimeError(f"the autoscaler put {name} on standby with jobs on it at t={now}")
                state[n] = "standby"
                set_up(n, False)
                paid_count -= 1
            run.scale_downs += 1
        else:
            run.scale_ups += 1
            run.nodes_activated += len(decision.nodes)
            run.floor_scale_ups += load <= options.autoscaler.scale_up_at * decision.capacity
            for name in decision.nodes:
                n = name_to_node[name]
                paid_count += 1
                if options.provisioning_delay_s > 0:
                    state[n] = "coming"
                    heappush(ready, (now + options.provisioning_delay_s, n))
                else:
                    state[n] = "up"
                    set_up(n, True)
            if options.provisioning_delay_s <= 0:
                place(now)
        run.paid.append((now, paid_count))

    enqueue, finish, observe = sched.enqueue, sched.finish, estimator.observe
    # With nodes on standby, queued jobs can outlive the last submit and the last end: the decisions
    # go on until they have all started.
    while i < total or ends or (scaling and sched.queued):
        now = jobs[i].submit if i < total else math.inf
        if ends and ends[0][0] < now:
            now = ends[0][0]
        if ready and ready[0][0] < now:
            now = ready[0][0]
        if scaling and next_tick < now:
            if now == math.inf and not ready and "standby" not in state:
                raise RuntimeError(f"{len(sched.queued)} queued jobs can never start, though every node is up")
            advance(next_tick)
            decide(next_tick)
            next_tick += interval
            continue
        advance(now)
        while ends and ends[0][0] <= now:
            _, k = heappop(ends)
            job = jobs[k]
            finish(k, now)
            allocated -= job.gpus
            observe(job.tenant, job.kind, job.gpus, job.duration)
        while i < total and jobs[i].submit <= now:
            job = jobs[i]
            enqueue(QueuedJob(id=i, team=job.tenant, kind=job.kind, gpus=job.gpus, submit=job.submit,
                              priority=job.priority, nodes=-(-job.gpus // gpus_per_node)))
            i += 1
        while ready and ready[0][0] <= now:
            _, n = heappop(ready)
            state[n] = "up"
            set_up(n, True)
        place(now)
        run.end = now

    run.fit_s = float(getattr(forecaster, "fit_seconds", 0.0))
    # Score each decision's load against the highest interval mean over its horizon.
    for k in range(len(run.predicted)):
        ahead = means[k + 1:min(count, k + 1 + steps_ahead)]
        if len(ahead) == steps_ahead:
            run.realized.append(float(ahead.max()))
    run.predicted = run.predicted[:len(run.realized)]
    return run


def wait_stats(jobs: list[TraceJob], starts: list[float]) -> dict:
    waits = sorted(s - j.submit for j, s in zip(jobs, starts, strict=True))
    return {
        "mean_wait_s": round(sum(waits) / len(waits), 1) if waits else 0.0,
        "p50_wait_s": round(_percentile(waits, 50), 1),
        "p95_wait_s": round(_percentile(waits, 95), 1),
        "p99_wait_s": round(_percentile(waits, 99), 1),
    }


def windows(jobs: list[TraceJob], run: AutoscaleRun) -> dict[str, tuple[float, float]]:
    """Where node-hours are counted: the whole run (to the last job's end), the submit window, and
    the middle 90 % of submits (without a trace's thin start and its long-job tail)."""
    submits = [j.submit for j in jobs]
    return {"run": (submits[0], run.end), "submits": (submits[0], submits[-1]),
            "middle_90pct_of_submits": (_percentile(submits, 5), _percentile(submits, 95))}


def summarize(jobs: list[TraceJob], run: AutoscaleRun, baseline: AutoscaleRun | None, nodes: int,
              gpus_per_node: int) -> dict:
    """The numbers of one run, and against the baseline (all nodes always active) when given."""
    unstarted = sum(1 for s in run.starts if math.isnan(s))
    if unstarted:
        raise RuntimeError(f"{unstarted} jobs never started")
    spans = windows(jobs, run)
    hours = {name: node_seconds(run.paid, a, b) / 3600 for name, (a, b) in spans.items()}
    other = metrics(jobs, run.starts, nodes * gpus_per_node)
    out = {
        "node_hours": {name: round(h, 1) for name, h in hours.items()},
        "mean_paid_nodes": {name: round(hours[name] * 3600 / (b - a), 2) if b > a else float(nodes)
                            for name, (a, b) in spans.items()},
        **wait_stats(jobs, run.starts),
        "mean_jct_s": other["mean_jct_s"],
        "makespan_s": other["makespan_s"],
        "decisions": run.decisions,
        "scale_ups": run.scale_ups,
        "nodes_activated": run.nodes_activated,
        "scale_ups_for_a_queued_job_larger_than_capacity": run.floor_scale_ups,
        "scale_downs": run.scale_downs,
    }
    if run.predicted:
        error = np.array(run.predicted) - np.array(run.realized)
        out["load_signal"] = {
            "method": run.forecast_method,
            "mae_gpus": round(float(np.mean(np.abs(error))), 2),
            "share_under_by_more_than_a_node": round(float(np.mean(error < -gpus_per_node)), 4),
            "refits": run.refits,
            "forecast_wall_s": round(run.forecast_s, 1),
            "prophet_fit_wall_s": round(run.fit_s, 1),
        }
    if baseline is not None:
        base_spans = windows(jobs, baseline)
        base_hours = {name: node_seconds(baseline.paid, a, b) / 3600 for name, (a, b) in base_spans.items()}
        base_waits = wait_stats(jobs, baseline.starts)
        out["saved_node_hours"] = {name: round(base_hours[name] - hours[name], 1) for name in hours}
        out["saved_pct"] = {name: round(100 * (base_hours[name] - hours[name]) / base_hours[name], 2)
                            if base_hours[name] else 0.0 for name in hours}
        out["added_wait_s"] = {k: round(out[k] - base_waits[k], 1) for k in base_waits}
    return out


def compare(jobs: list[TraceJob], config: PolicyConfig, nodes: int, gpus_per_node: int,
            options: Sequence[tuple[str, ReplayOptions]], racks: int = 1,
            weights: dict[str, float] | None = None) -> dict:
    """The baseline, then each named option set against it, with wall times."""
    began = time.perf_counter()
    baseline = simulate_autoscaled(jobs, config, nodes, gpus_per_node, ReplayOptions(mode="off"), racks, weights)
    out = {"baseline": summarize(jobs, baseline, None, nodes, gpus_per_node)}
    out["baseline"]["wall_s"] = round(time.perf_counter() - began, 2)
    for name, option in options:
        began = time.perf_counter()
        run = simulate_autoscaled(jobs, config, nodes, gpus_per_node, option, racks, weights)
        out[name] = summarize(jobs, run, baseline, nodes, gpus_per_node)
        out[name]["wall_s"] = round(time.perf_counter() - began, 2)
    return out
