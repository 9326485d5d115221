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
SERVED_ORDERS = ("slowdown", "wfq")


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
    # Preemption: seconds run in earlier attempts, how often it was preempted, and whether it is being
    # stopped for a preemption right now (its GPUs come back when its worker confirms).
    ran_s: float = 0.0
    preemptions: int = 0
    preempting: bool = False

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
    # The run-time estimate and WFQ tags stamped when the job was first queued (Decision.tags hands
    # them out; keep them): a job is stamped once, as WFQ stamps a packet on arrival. None: now.
    estimated_runtime_s: float | None = None
    start_tag: float | None = None
    finish_tag: float | None = None
    # Seconds run in earlier attempts (a preempted or retried job) and how often it was preempted.
    ran_s: float = 0.0
    preemptions: int = 0


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
    # Cost multiplier of a job that asks for GPU memory: 1 + memory_factor * min(1, asked / reference).
    memory_factor: float = 0.5
    memory_reference_mb: int = 81920
    # Fair share with memory: past GPU-seconds count half after one half-life; the team's decayed
    # usage / weight is added to its jobs' finish tags, times fair_share_weight.
    fair_share_half_life_s: float = 24 * 3600.0
    fair_share_weight: float = 1.0
    # A job queued longer than this goes before every younger job, oldest first, with a reservation.
    aging_s: float = 24 * 3600.0
    backfill: bool = True
    reservation_depth: int = 1  # EASY: one reservation for the first job that cannot start...
    max_reservations: int = 8  # ...plus one for each job past the aging bound, up to this many in all
    # Run-time estimator: a percentile of the recent completions of a group, how many it keeps, how
    # many it needs before it trusts a group, and the fallback per kind when it has none.
    estimate_percentile: float = 50.0
    estimate_window: int = 200
    estimate_min_samples: int = 3
    runtime_priors_s: Mapping[str, float] = field(default_factory=_default_runtime_priors)
    # The least a job that has overrun its estimate is still expected to run.
    overrun_grace_s: float = 300.0
    # Preemption (wfq only), two-class least-attained-service: a queued job that has run less than
    # `preempt_threshold_gpu_s` GPU-seconds goes before every job that has run more, and when it cannot
    # start it may stop running jobs past that mark (of a kind in `preemptible_kinds`, running this
    # attempt for at least `preempt_min_run_s`, preempted fewer than `max_preemptions_per_job` times;
    # None: no limit). A stopped job goes back to the queue and resumes from its last checkpoint.
    preemption: bool = True
    preempt_threshold_gpu_s: float = 4 * 3600.0
    preempt_min_run_s: float = 1800.0
    preemptible_kinds: frozenset[str] = frozenset({"training"})
    max_preemptions_per_job: int | None = None
    # The order among queued jobs past the mark: "slowdown" puts first the one that would end with the
    # largest slowdown if it started now ((queued so far + run so far + estimate left) / (run so far +
    # estimate left)); "wfq" keeps the finish tag + fair-share level order of the fresh jobs.
    served_order: str = "slowdown"

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, not {self.policy!r}")
        if self.fair_share_half_life_s < 0 or self.aging_s <= 0:
            raise ValueError("fair_share_half_life_s must be >= 0 and aging_s > 0")
        if self.reservation_depth < 0 or self.max_reservations < 0:
            raise ValueError("reservation_depth and max_reservations must be >= 0")
        if self.preempt_threshold_gpu_s < 0 or self.preempt_min_run_s < 0:
            raise ValueError("preempt_threshold_gpu_s and preempt_min_run_s must be >= 0")
        if self.max_preemptions_per_job is not None and self.max_preemptions_per_job < 0:
            raise ValueError("max_preemptions_per_job must be >= 0 or None")
        if self.served_order not in SERVED_ORDERS:
            raise ValueError(f"served_order must be one of {', '.join(SERVED_ORDERS)}, not {self.served_order!r}")
        object.__setattr__(self, "preemptible_kinds", frozenset(self.preemptible_kinds))


@dataclass(frozen=True, slots=True)
class Snapshot:
    now: float
    nodes: Sequence[NodeSpec]
    running: Sequence[RunningJob]
    queued: Sequence[QueuedJob]
    teams: Sequence[TeamSpec]
    # WFQ state the caller keeps between passes (Decision hands back the new values): the virtual time
    # (None: the smallest start tag among queued jobs) and each flow's last finish tag, by (team, kind).
    virtual_time: float | None = None
    flow_finish: Mapping[tuple[Hashable, str], float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Reservation:
    time: float  # the job's earliest start, from the estimated ends of running jobs
    nodes: tuple[Hashable, ...]


@dataclass(slots=True)
class Pending:
    position: int  # 1-based, among the jobs still queued after the pass, in scheduler order
    flow: str  # "team/kind"
    start_tag: float  # WFQ tags, in normalised GPU-seconds (GPU-seconds / weight)
    finish_tag: float
    reason: str
    # quota_per_job | never_fits | max_gpus | month_quota | reserved | reservation | capacity | order
    # | preempting (running jobs are being stopped to make room for it); the live pass adds `dependency`
    # for jobs it keeps out of the snapshot until the jobs they depend on succeed, and `held` for jobs a
    # user holds
    code: str


@dataclass(slots=True)
class Decision:
    placements: dict[Hashable, list[tuple[Hashable, list[Hashable]]]] = field(default_factory=dict)
    reservations: dict[Hashable, Reservation] = field(default_factory=dict)
    pending: dict[Hashable, Pending] = field(default_factory=dict)  # every job still queued, in order
    # Running jobs to stop and requeue, each with the reason (which job it makes room for, and why).
    preemptions: dict[Hashable, str] = field(default_factory=dict)
    # What to keep for the next pass: every queued job's (estimate, start tag, finish tag), the
    # virtual time, and each flow's last finish tag.
    stamps: dict[Hashable, tuple[float, float, float]] = field(default_factory=dict)
    virtual_time: float = 0.0
    flow_finish: dict[tuple[Hashable, str], float] = field(default_factory=dict)
