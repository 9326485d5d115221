"""Per-layer sensitivity and the format assignment built on it.

Sensitivity of (layer, format) = the calibration score lost when only that layer's weight is
quantized to that format (measured, not estimated: the layer is fake-quantized in place, the
calibration set is run, the weight is restored). Assignment is greedy: starting from fp32, take the
move (one layer to a cheaper format) with the most bytes saved per unit of added sensitivity, while
the summed sensitivity stays within the budget; then the whole assignment is measured on the
calibration set and, if the layers' drops did not add up as assumed, the latest moves are undone
(binary search over the move order) until the measured drop fits — or, if they added up to less than
assumed, the greedy is rerun with a budget scaled by the overestimate and cut back the same way.
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


def assignment_bytes(model: nn.Module, assignment: dict[str, str]) -> int:
    layers = quantizable_layers(model)
    return sum(estimate_bytes(tuple(layers[name].weight.shape), fmt) for name, fmt in assignment.items())


# How far the slack extension may scale the greedy's budget (auto_assign), and how many times it extends.
MAX_EXTENSION = 4.0
EXTENSION_ROUNDS = 2


def _longest_fitting_prefix(
    task: Task, model: nn.Module, moves: list[tuple[str, str]], lo: int, hi: int, base: float, target: float,
    rounding: Rounding,
) -> tuple[int, float | None, int]:
    """The longest prefix of `moves`, `lo` to `hi` long, whose measured drop fits `target` (binary search
    over the move order, assuming the drop grows along it), its drop (None when only `lo` fits and it was
    not measured here), and how many assignments were measured."""
    drop, runs = None, 0
    while lo < hi:
        mid = math.ceil((lo + hi) / 2)
        d = measured_drop(task, model, assignment_from(model, moves[:mid]), base, rounding)
        runs += 1
        if d <= target:
            lo, drop = mid, d
        else:
            hi = mid - 1
    return lo, drop, runs


def auto_assign(
    task: Task,
    model: nn.Module,
    sens: dict[str, dict[str, float]],
    budget: float,
    margin: float = CALIBRATION_MARGIN,
    rounding: Rounding = RTN,
    extend: bool = True,
) -> tuple[dict[str, str], dict]:
    """Greedy assignment, then checked against the measured calibration drop: cut back if it does not fit,
    extended if it leaves slack.

    The greedy adds the layers' sensitivities as if their drops were independent. When the measured drop of
    the whole assignment is below that sum (layers' errors partly cancel or saturate), the greedy runs again
    with its budget scaled by predicted / measured (at most MAX_EXTENSION x) and the longest prefix of the
    longer move list whose measured drop still fits is kept, if it is smaller; at most EXTENSION_ROUNDS
    times. Every kept assignment's drop is measured, never predicted."""
    given = budget
    target = budget * margin
    base = task.calib_score(model)

    def predicted_of(moves: list[tuple[str, str]]) -> float:
        cost: dict[str, float] = {}
        for name, fmt in moves:
            cost[name] = max(sens[name][fmt], 0.0)
        return sum(cost.values())

    moves = greedy_moves(model, sens, target)
    predicted = predicted_of(moves)
    drop = measured_drop(task, model, assignment_from(model, moves), base, rounding)
    evaluations = 1
    kept = len(moves)
    if drop > target and moves:
        # the whole list was measured and does not fit
        kept, fit_drop, runs = _longest_fitting_prefix(task, model, moves, 0, len(moves) - 1, base, target, rounding)
        evaluations += runs
        drop = fit_drop if fit_drop is not None else measured_drop(
            task, model, assignment_from(model, moves[:kept]), base, rounding
        )
        evaluations += fit_drop is None
    greedy_moves_n, greedy_kept, greedy_drop = len(moves), kept, drop
    extensions = []
    scale = 1.0
    for _ in range(EXTENSION_ROUNDS if extend else 0):
        used = predicted_of(moves[:kept])
        if kept < len(moves) or used <= 0 or drop >= target:
            break  # cut back already, nothing spent, or no slack left
        # the budget at which the summed sensitivities, overestimating as they did here, would measure `target`
        wanted = min(MAX_EXTENSION, used / max(drop, used / MAX_EXTENSION))
        if wanted <= scale * 1.01:
            break
        scale = wanted
        longer = greedy_moves(model, sens, target * scale)
        if len(longer) <= kept:
            break
        # the longer list starts like the kept one until the first move the smaller budget refused: that
        # common prefix fits (it is a prefix of the kept one)
        same = next((i for i, (a, b) in enumerate(zip(longer, moves[:kept], strict=False)) if a != b), kept)
        n, fit_drop, runs = _longest_fitting_prefix(task, model, longer, same, len(longer), base, target, rounding)
        evaluations += runs
        better = fit_drop is not None and (
            assignment_bytes(model, assignment_from(model, longer[:n]))
            < assignment_bytes(model, assignment_from(model, moves[:kept]))
        )
        extensions.append({"budget_scale": round(scale, 3), "moves": len(longer), "kept": n,
                           "measured_calib_drop": fit_drop, "taken": better})
        if not better:
            break
        moves, kept, drop = longer, n, fit_drop
    info = {
        "method": "greedy: most bytes saved per unit of measured sensitivity, within the budget; "
        "then verified on calibration data with the latest moves undone until it fits, or, where the "
        "measured drop leaves slack, the greedy rerun with a larger budget and cut back to fit",
        "budget": given,
        "calibration_target": target,
        "predicted_drop": predicted_of(moves[:kept]),
        "measured_calib_drop": drop,
        "moves": len(moves),
        "moves_kept": kept,
        "greedy": {"moves": greedy_moves_n, "kept": greedy_kept, "predicted_drop": predicted,
                   "measured_calib_drop": greedy_drop},
        "extensions": extensions,
        "evaluations": evaluations,
    }
    return assignment_from(model, moves[:kept]), info


def default_formats(group_size: int) -> list[str]:
    return candidate_formats(group_size)
