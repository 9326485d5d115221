"""What the policy core takes in and gives back. Plain dataclasses: no Django, no database.

Times are float seconds: seconds since the epoch live, virtual seconds in a replay. Node, GPU, job and
team ids are whatever hashable ids the caller uses (database primary keys live, ints in a replay).
"""
from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field

NODE_STATES = ("active", "draining", "standby", "down")
PRIORITIES = ("low", "normal", "high", "urgent")
POLICIES = ("wfq", "fifo", "firstfit")


@dataclass(frozen=True, slots=True)
class GpuSpec:
    gpu_id: Hashable
    index: int
    memory_mb: int


@dataclass(frozen=True, slots=True)
class NodeSpec:
    id: Hashable
    name: str
    rack: str
    state: str  # active | draining | standby | down; only active nodes get new work
    gpus: tuple[GpuSpec, ...]
    free_gpu_ids: frozenset = frozenset()


@dataclass(frozen=True, slots=True)
class RunningJob:
    id: Hashable
    team: Hashable
    kind: str
    gpus: Mapping[Hashable, Sequence[Hashable]]  # node id -> GPU ids held there
    start: float
    # When the job is expected to end. None: start + the estimator's answer (walltime first).
    estimated_end: float | None = None
    walltime_s: float | None = None

    @property
    def gpu_count(self) -> int:
        return sum(len(ids) for ids in self.gpus.values())


@dataclass(frozen=True, slots=True)
class QueuedJob:
    id: Hashable
    team: Hashable
    kind: str
    gpus: int
    submit: float
    priority: str = "normal"
    nodes: int = 1
    gpu_memory_mb: int | None = None  # minimum memory of each GPU, None: any GPU
    walltime_s: float | None = None
    attempt: int = 1
    # The run-time estimate frozen when the job was first queued, so that its WFQ tags do not move
    # under it as the estimator learns (classic WFQ stamps a packet once, on arrival). None: ask the
    # estimator now.
    estimated_runtime_s: float | None = None


@dataclass(frozen=True, slots=True)
class TeamSpec:
    id: Hashable
    name: str
    weight: float = 1.0
    max_gpus: int | None = None  # GPUs held at once; None: no limit
    gpu_hours_per_month: float | None = None
    max_gpus_per_job: int | None = None
    gpu_seconds_used_this_month: float = 0.0
    # GPU-seconds used, each second decayed by its age with PolicyConfig.fair_share_half_life_s
    # (see policy.fairshare.decayed_usage); includes the part of running jobs already run.
    decayed_usage: float = 0.0


def _default_kind_weights() -> dict[str, float]:
    return {"training": 1.0, "compression": 1.0}


def _default_priority_factors() -> dict[str, float]:
    return {"low": 0.5, "normal": 1.0, "high": 2.0, "urgent": 4.0}


def _default_runtime_priors() -> dict[str, float]:
    return {"training": 4 * 3600.0, "compression": 1800.0}


@dataclass(frozen=True)
class PolicyConfig:
    """Every knob of the policy; docs/scheduler.md gives each default and why it is that."""

    policy: str = "wfq"  # wfq | fifo (strict arrival order, no backfill) | firstfit (arrival order, greedy)
    kind_weights: Mapping[str, float] = field(default_factory=_default_kind_weights)
    priority_factors: Mapping[str, float] = field(default_factory=_default_priority_factors)
    # Cost multiplier for a job that asks for GPU memory: 1 + memory_factor * min(1, asked / reference).
    memory_factor: float = 0.5
    memory_reference_mb: int = 81920
    fair_share_half_life_s: float = 6 * 3600.0
    # A job queued longer than this goes ahead of every job that is not, oldest first.
    aging_s: float = 24 * 3600.0
    backfill: bool = True
    order_tag: str = 'finish'
    lindy: bool = False
    # Run-time estimator: which percentile of the recent completions, how many of them it keeps,
    # how many it needs before it trusts a group, and the fallback when it has none.
    estimate_percentile: float = 50.0
    estimate_window: int = 200
    estimate_min_samples: int = 3
    runtime_priors_s: Mapping[str, float] = field(default_factory=_default_runtime_priors)
    # An overrunning job is assumed to need this much longer when nothing better is known.
    overrun_grace_s: float = 300.0

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, not {self.policy!r}")
        if self.fair_share_half_life_s < 0 or self.aging_s <= 0:
            raise ValueError("fair_share_half_life_s must be >= 0 and aging_s > 0")


@dataclass(frozen=True, slots=True)
class Snapshot:
    now: float
    nodes: Sequence[NodeSpec]
    running: Sequence[RunningJob]
    queued: Sequence[QueuedJob]
    teams: Sequence[TeamSpec]


@dataclass(frozen=True, slots=True)
class Reservation:
    time: float  # the job's earliest start, from the estimated ends of running jobs
    nodes: tuple[Hashable, ...]


@dataclass(frozen=True, slots=True)
class Pending:
    position: int  # 1-based, among the jobs still queued after the pass, in scheduler order
    flow: str  # "team/kind"
    start_tag: float
    finish_tag: float  # virtual finish tag (normalised GPU-seconds); lower goes first
    reason: str
    code: str  # machine-readable reason: quota_per_job, never_fits, max_gpus, month_quota, reserved,
    # reservation, capacity, order


@dataclass(slots=True)
class Decision:
    placements: dict[Hashable, list[tuple[Hashable, list[Hashable]]]] = field(default_factory=dict)
    reservations: dict[Hashable, Reservation] = field(default_factory=dict)
    pending: dict[Hashable, Pending] = field(default_factory=dict)  # in scheduler order
