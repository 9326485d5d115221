"""Run-time estimates learned from completed jobs; it never sees a job's true duration before it ends."""
from __future__ import annotations

from bisect import bisect_left, insort
from collections import deque
from collections.abc import Hashable, Iterable

from .types import PolicyConfig


class _Window:
    """The last `size` observations, also kept sorted so a percentile is one index away."""

    __slots__ = ("recent", "size", "sorted")

    def __init__(self, size: int):
        self.size = size
        self.recent: deque[float] = deque()
        self.sorted: list[float] = []

    def add(self, value: float) -> None:
        self.recent.append(value)
        insort(self.sorted, value)
        if len(self.recent) > self.size:
            old = self.recent.popleft()
            # Any entry equal to the oldest value is as good as the oldest itself.
            del self.sorted[bisect_left(self.sorted, old)]

    def percentile(self, q: float) -> float:
        values = self.sorted
        return values[min(len(values) - 1, int(q / 100.0 * len(values)))]

    def __len__(self) -> int:
        return len(self.recent)


class RuntimeEstimator:
    """Walltime when the job gives one; else a percentile of recent run times of the same team, kind
    and GPU count, then of the same team and kind, then of the kind across teams, then a fixed prior.

    The GPU count refines the team-and-kind group because in real traces size and length go together
    (Philly: a median 1-GPU job runs 25 minutes, a median 8-GPU job 29 hours).
    """

    def __init__(self, config: PolicyConfig | None = None):
        self.config = config or PolicyConfig()
        self._windows: dict[tuple, _Window] = {}
        self._cache: dict[tuple, float] = {}

    def observe(self, team: Hashable, kind: str, gpus: int, runtime_s: float) -> None:
        """Feed one completed job (its real run time, known only now that it has ended)."""
        runtime_s = max(0.0, float(runtime_s))
        size = self.config.estimate_window
        for key in ((team, kind, gpus), (team, kind), (kind,)):
            window = self._windows.get(key)
            if window is None:
                window = self._windows[key] = _Window(size)
            window.add(runtime_s)
        self._cache.clear()

    def observe_many(self, completions: Iterable[tuple[Hashable, str, int, float]]) -> None:
        for team, kind, gpus, runtime_s in completions:
            self.observe(team, kind, gpus, runtime_s)

    def estimate(self, team: Hashable, kind: str, gpus: int, walltime_s: float | None = None) -> float:
        if walltime_s is not None and walltime_s > 0:
            return float(walltime_s)
        key = (team, kind, gpus)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        value = self._learned(team, kind, gpus)
        self._cache[key] = value
        return value

    def _learned(self, team: Hashable, kind: str, gpus: int) -> float:
        config = self.config
        for key in ((team, kind, gpus), (team, kind), (kind,)):
            window = self._windows.get(key)
            if window is not None and len(window) >= config.estimate_min_samples:
                return max(1.0, window.percentile(config.estimate_percentile))
        return float(config.runtime_priors_s.get(kind, 3600.0))
