"""The scheduling policy core: pure Python, no Django.

`schedule(snapshot, estimator, config)` makes one pass (placements, reservations, a position, flow,
tags and reason for every other queued job); `forecast_etas(snapshot, estimator, config)` plays the
queue forward for ETAs; `Scheduler` is the incremental form the trace replayer drives.
"""
from .engine import Scheduler, schedule
from .estimator import RuntimeEstimator
from .explain import default_format_time
from .fairshare import decayed_usage
from .forecast import forecast_etas
from .types import (
    Decision,
    GpuSpec,
    NodeSpec,
    Pending,
    PolicyConfig,
    QueuedJob,
    Reservation,
    RunningJob,
    Snapshot,
    TeamSpec,
)

__all__ = [
    "Decision",
    "GpuSpec",
    "NodeSpec",
    "Pending",
    "PolicyConfig",
    "QueuedJob",
    "Reservation",
    "RunningJob",
    "RuntimeEstimator",
    "Scheduler",
    "Snapshot",
    "TeamSpec",
    "decayed_usage",
    "default_format_time",
    "forecast_etas",
    "schedule",
]
