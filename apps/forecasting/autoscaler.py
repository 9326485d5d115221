"""The autoscaler's rule, pure (no Django), so the live task and the trace replay decide the same way.

Load is the forecast of allocated GPUs over the next `horizon` (its peak). With C the GPUs of the
active nodes:

- peak > scale_up_at × C: bring standby nodes back, the fewest that bring the peak under the line
  (all there are if that is not enough);
- peak < scale_down_below × C, continuously for `below_for_s`, and no change for `cooldown_s`:
  put one idle active node (no live allocation) on standby, never going under `min_active_nodes`,
  and only if the peak stays under the middle of the two lines on the capacity left — otherwise
  the next forecast would bring it straight back (hysteresis);
- otherwise nothing.

A node with running jobs is never drained; one node at a time goes down, any number come back.

`min_capacity` (GPUs) is the floor that the queue sets, whatever the forecast: the GPUs of the
largest queued job. A job larger than the active capacity allocates nothing, so it raises neither
the allocated GPUs nor their forecast, and without the floor it would wait for ever on a quiet
cluster. Below the floor, standby nodes come back; no node goes down that would take the active
capacity under it.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class NodeView:
    name: str
    gpus: int
    state: str  # active | draining | standby | down
    busy: bool  # holds a live allocation


@dataclass(frozen=True, slots=True)
class AutoscalerConfig:
    scale_up_at: float = 0.8
    scale_down_below: float = 0.5
    below_for_s: float = 1800.0
    cooldown_s: float = 900.0
    min_active_nodes: int = 1

    def __post_init__(self) -> None:
        if not 0 < self.scale_down_below < self.scale_up_at <= 1:
            raise ValueError("need 0 < scale_down_below < scale_up_at <= 1")
        if self.min_active_nodes < 0 or self.below_for_s < 0 or self.cooldown_s < 0:
            raise ValueError("min_active_nodes, below_for_s and cooldown_s must not be negative")


@dataclass(slots=True)
class Plan:
    action: str | None  # "activate" | "standby" | None
    nodes: list[str] = field(default_factory=list)
    reason: str = ""
    low_since: float | None = None  # carry to the next call
    capacity: int = 0


def _fmt(x: float) -> str:
    return f"{x:.1f}".rstrip("0").rstrip(".")


def plan(nodes: Sequence[NodeView], peak: float, now: float, *, low_since: float | None,
         last_change_at: float | None, config: AutoscalerConfig, min_capacity: int = 0) -> Plan:
    """Decide what to do now, given the forecast peak of allocated GPUs over the horizon and the
    GPUs of the largest queued job (`min_capacity`)."""
    active = [n for n in nodes if n.state == "active"]
    capacity = sum(n.gpus for n in active)
    up_line = config.scale_up_at * capacity

    if peak > up_line or capacity < min_capacity:
        standby = sorted((n for n in nodes if n.state == "standby"), key=lambda n: (-n.gpus, n.name))
        chosen, new_capacity = [], capacity
        for node in standby:
            if peak <= config.scale_up_at * new_capacity and new_capacity >= min_capacity:
                break
            chosen.append(node.name)
            new_capacity += node.gpus
        why = (f"forecast peak {_fmt(peak)} GPUs > {config.scale_up_at:.0%} of {capacity} active GPUs"
               if peak > up_line else f"a queued job needs {min_capacity} GPUs, {capacity} are active")
        if not chosen:
            return Plan(None, reason=f"{why}, but no node is on standby", capacity=capacity)
        return Plan("activate", chosen, capacity=capacity,
                    reason=f"{why}; {len(chosen)} standby node{'s' if len(chosen) > 1 else ''} back, "
                           f"{new_capacity} GPUs")

    if peak >= config.scale_down_below * capacity:
        return Plan(None, low_since=None, capacity=capacity)

    low_since = now if low_since is None else low_since
    if now - low_since < config.below_for_s:
        return Plan(None, low_since=low_since, capacity=capacity,
                    reason=f"low for {_fmt((now - low_since) / 60)} of {_fmt(config.below_for_s / 60)} min")
    if last_change_at is not None and now - last_change_at < config.cooldown_s:
        return Plan(None, low_since=low_since, capacity=capacity, reason="cooling down after the last change")
    if len(active) <= config.min_active_nodes:
        return Plan(None, low_since=low_since, capacity=capacity,
                    reason=f"at the minimum of {config.min_active_nodes} active node(s)")
    middle = (config.scale_up_at + config.scale_down_below) / 2
    # The largest idle node whose removal keeps the peak under the middle line saves the most.
    for node in sorted((n for n in active if not n.busy), key=lambda n: (-n.gpus, n.name)):
        left = capacity - node.gpus
        if left > 0 and left >= min_capacity and peak <= middle * left:
            return Plan("standby", [node.name], low_since=None, capacity=capacity,
                        reason=f"forecast peak {_fmt(peak)} GPUs < {config.scale_down_below:.0%} of {capacity} active "
                               f"GPUs for {_fmt((now - low_since) / 60)} min; {node.name} is idle, {left} GPUs left")
    return Plan(None, low_since=low_since, capacity=capacity,
                reason="no idle node can go without pushing the forecast over the middle line")
