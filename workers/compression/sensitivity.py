"""Per-layer sensitivity and the format assignment built on it.

Sensitivity of (layer, format) = the calibration score lost when only that layer's weight is
quantized to that format (measured, not estimated: the layer is fake-quantized in place, the
calibration set is run, the weight is restored). Assignment is greedy: starting from fp32, take the
move (one layer to a cheaper format) with the most bytes saved per unit of added sensitivity, while
the summed sensitivity stays within the budget; then the whole assignment is measured on the
calibration set and, if the layers' drops did not add up as assumed, the latest moves are undone
(binary search over the move order) until the measured drop fits.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .models import CALIBRATION_MARGIN, Task
from .quantize import FULL, RTN, Rounding, apply_simulated, candidate_formats, estimate_bytes, quantizable_layers

EPS = 1e-6
Progress = Callable[[float], None]


class StageReplay:
    """Skip the trunk in front of the layer being probed: its stages return their cached outputs.

    Quantizing one layer changes nothing upstream of it, so for a layer in block k the outputs of
    the embeddings and blocks 0..k-1 on each calibration batch are the ones recorded once, unquantized.
    """

    def __init__(self, task: Task, model: nn.Module):
        self.stages = task.stages(model)
        self.cache: list[list] = [[] for _ in self.stages]
        order = {id(m): i for i, (_, m) in enumerate(model.named_modules())}
        self.stage_pos = [order[id(s)] for s in self.stages]
        self.owner: dict[int, int] = {}
        for k, stage in enumerate(self.stages):
            for m in stage.modules():
                self.owner[id(m)] = k
        self.order = order
        if self.stages:
            hooks = [
                s.register_forward_hook(lambda _m, _i, out, k=k: self.cache[k].append(out))
                for k, s in enumerate(self.stages)
            ]
            try:
                task.calib_score(model)
            finally:
                for h in hooks:
                    h.remove()

    def replayable(self, layer: nn.Module) -> int:
        """How many leading stages may be replayed when `layer` alone changes."""
        if id(layer) in self.owner:
            return self.owner[id(layer)]
        return sum(1 for pos in self.stage_pos if pos < self.order[id(layer)])

    def score(self, task: Task, model: nn.Module, layer: nn.Module) -> float:
        n = self.replayable(layer)
        for k in range(n):
            outputs = iter(self.cache[k])
            self.stages[k].forward = lambda *_a, _it=outputs, **_kw: next(_it)
        try:
            return task.calib_score(model)
        finally:
            for k in range(n):
                del self.stages[k].forward


def measure(
    task: Task, model: nn.Module, formats: list[str], progress: Progress | None = None, rounding: Rounding = RTN,
    linear_formats: list[str] | None = None,
) -> dict[str, dict[str, float]]:
    """{layer: {format: calibration drop}} with every other layer left as it is. Linear layers are tried
    in `linear_formats` when given (the assignment can then only choose those for them), others in
    `formats`."""
    base = task.calib_score(model)
    replay = StageReplay(task, model)
    layers = quantizable_layers(model)

    def formats_of(layer: nn.Module) -> list[str]:
        return linear_formats if linear_formats and isinstance(layer, nn.Linear) else formats

    result: dict[str, dict[str, float]] = {}
    total = sum(len(formats_of(layer)) for layer in layers.values())
    done = 0
    for name, layer in layers.items():
        original = layer.weight.detach().clone()
        result[name] = {}
        for fmt in formats_of(layer):
            with torch.no_grad():
                layer.weight.copy_(rounding.fake_quant(name, original, fmt))
            result[name][fmt] = base - replay.score(task, model, layer)
            done += 1
            if progress:
                progress(done / total)
        with torch.no_grad():
            layer.weight.copy_(original)
    return result


def preset(model: nn.Module, group_size: int) -> dict[str, str]:
    """The fixed preset: attention Q/K/V in fp8, every other Linear (and Conv) in int4, embeddings in fp32."""
    assignment = {}
    for name, layer in quantizable_layers(model).items():
        if isinstance(layer, nn.Embedding):
            assignment[name] = FULL
        elif name.rsplit(".", 1)[-1] in {"query", "key", "value", "q_proj", "k_proj", "v_proj"}:
            assignment[name] = "fp8_e4m3"
        else:
            assignment[name] = f"int4_g{group_size}"
    return assignment


def greedy_moves(model: nn.Module, sens: dict[str, dict[str, float]], budget: float) -> list[tuple[str, str]]:
    """Ordered (layer, format) moves; applying a prefix gives an assignment."""
    layers = quantizable_layers(model)
    size = {
        name: {fmt: estimate_bytes(tuple(layers[name].weight.shape), fmt) for fmt in [FULL, *sens[name]]}
        for name in sens
    }
    current = dict.fromkeys(sens, FULL)
    cost = dict.fromkeys(sens, 0.0)
    spent = 0.0
    moves = []
    while True:
        best = None
        for name, options in sens.items():
            for fmt, drop in options.items():
                saved = size[name][current[name]] - size[name][fmt]
                if saved <= 0:
                    continue
                # A negative measured drop is noise, not a gain: it never pays for another layer's loss.
                added = max(drop, 0.0) - cost[name]
                if spent + added > budget + 1e-12:
                    continue
                score = saved / max(added, EPS)
                if best is None or score > best[0]:
                    best = (score, name, fmt, added)
        if best is None:
            return moves
        _, name, fmt, added = best
        current[name] = fmt
        cost[name] += added
        spent += added
        moves.append((name, fmt))


def assignment_from(model: nn.Module, moves: list[tuple[str, str]]) -> dict[str, str]:
    assignment = dict.fromkeys(quantizable_layers(model), FULL)
    for name, fmt in moves:
        assignment[name] = fmt
    return assignment


def measured_drop(
    task: Task, model: nn.Module, assignment: dict[str, str], base: float, rounding: Rounding = RTN
) -> float:
    import copy

    return base - task.calib_score(apply_simulated(copy.deepcopy(model), assignment, rounding))


def auto_assign(
    task: Task,
    model: nn.Module,
    sens: dict[str, dict[str, float]],
    budget: float,
    margin: float = CALIBRATION_MARGIN,
    rounding: Rounding = RTN,
) -> tuple[dict[str, str], dict]:
    """Greedy assignment, then checked against the measured calibration drop and cut back if needed."""
    given = budget
    budget = budget * margin
    base = task.calib_score(model)
    moves = greedy_moves(model, sens, budget)
    predicted = 0.0
    if moves:
        cost: dict[str, float] = {}
        for name, fmt in moves:
            cost[name] = max(sens[name][fmt], 0.0)
        predicted = sum(cost.values())
    drop = measured_drop(task, model, assignment_from(model, moves), base, rounding)
    kept = len(moves)
    if drop > budget and moves:
        lo, hi = 0, len(moves) - 1  # a prefix of length lo fits (the empty one does); find the longest
        while lo < hi:
            mid = math.ceil((lo + hi) / 2)
            if measured_drop(task, model, assignment_from(model, moves[:mid]), base, rounding) <= budget:
                lo = mid
            else:
                hi = mid - 1
        kept = lo
        drop = measured_drop(task, model, assignment_from(model, moves[:kept]), base, rounding)
    info = {
        "method": "greedy: most bytes saved per unit of measured sensitivity, within the budget; "
        "then verified on calibration data with the latest moves undone until it fits",
        "budget": given,
        "calibration_target": budget,
        "predicted_drop": predicted,
        "measured_calib_drop": drop,
        "moves": len(moves),
        "moves_kept": kept,
    }
    return assignment_from(model, moves[:kept]), info


def default_formats(group_size: int) -> list[str]:
    return candidate_formats(group_size)
