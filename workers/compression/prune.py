"""Structured pruning with Torch-Pruning's dependency graph (DepGraph) and accumulated Taylor importance.

Channels, MLP neurons and attention heads are removed from the tensors (parameter count and MACs
drop), unlike `torch.nn.utils.prune`, which only masks. Importance is |w · ∂L/∂w| accumulated as an
absolute value over T gradient steps before each of the iterative pruning steps (Torch-Pruning's
GroupTaylorImportance reads (w · grad) once; accumulating the absolute value per step keeps gradients
of opposite sign from cancelling). The loss L is the task loss for classifiers (cross-entropy on
labels) and, for models without labels, a random projection <f(x), r> of the output with a fresh r
each step, whose gradient J^T r samples how strongly each weight moves the output.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from .distill import distill
from .models import Task, to_device


class AccumulatedTaylorImportance(tp.importance.GroupTaylorImportance):
    """GroupTaylorImportance over Σ_t |w · g_t| instead of |w · g| for one gradient."""

    def __init__(self) -> None:
        super().__init__(group_reduction="mean", normalizer="mean")
        self.acc: dict[int, torch.Tensor] = {}

    def reset(self) -> None:
        self.acc = {}

    @torch.no_grad()
    def accumulate(self, model: nn.Module) -> None:
        for p in model.parameters():
            if p.grad is not None:
                term = (p.detach() * p.grad).abs()
                self.acc[id(p)] = self.acc[id(p)] + term if id(p) in self.acc else term

    @torch.no_grad()
    def __call__(self, group):
        # The parent computes (w * grad).abs(); with w := 1 and grad := Σ|w·g| it reads the accumulated sum.
        swapped = []
        for dep, _ in group:
            for p in (getattr(dep.target.module, "weight", None),):
                if isinstance(p, nn.Parameter) and id(p) in self.acc and all(p is not s[0] for s in swapped):
                    swapped.append((p, p.data, p.grad))
                    p.data = torch.ones_like(p.data)
                    p.grad = self.acc[id(p)]
        try:
            return super().__call__(group)
        finally:
            for p, data, grad in swapped:
                p.data = data
                p.grad = grad


def _taylor_loss(task: Task, model: nn.Module, inputs: tuple, target: torch.Tensor | None, step: int) -> torch.Tensor:
    out = model(*inputs)
    if task.kind == "classifier" and target is not None:
        return F.cross_entropy(out, target)
    r = torch.randn(out.shape, generator=torch.Generator().manual_seed(10_000 + step)).to(out.device, out.dtype)
    return (out * r).sum() / out.shape[0]


def _setup(task: Task, model: nn.Module) -> dict:
    """Which layers are roots that may lose output channels, per architecture."""
    ignored: list[nn.Module] = []
    num_heads: dict[nn.Module, int] = {}
    transformer = False
    for name, m in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(m, nn.Embedding):
            ignored.append(m)
        if task.arch in ("minilm-l6", "bert-base"):
            transformer = True
            # The hidden size is shared by every residual add and LayerNorm: keep it, prune heads and neurons.
            if name.endswith("attention.output.dense") or (name.endswith("output.dense") and "attention" not in name):
                ignored.append(m)
            if leaf in ("query", "key", "value"):
                num_heads[m] = model.bert.config.num_attention_heads
        elif task.arch == "llama-1b":
            transformer = True
            # Grouped-query attention ties K/V heads to several Q heads: only MLP neurons are pruned here.
            if leaf in ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj", "lm_head"):
                ignored.append(m)
    if not transformer:
        # The last Linear produces the classes: its outputs are not channels to remove.
        last_linear = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        ignored.append(last_linear)
    return {"ignored_layers": ignored, "num_heads": num_heads}


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def kept_fractions(before: nn.Module, after: nn.Module) -> dict[str, float]:
    """Per layer, the share of output channels (rows) that survived."""
    b = {n: m.weight.shape[0] for n, m in before.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding))}
    return {n: m.weight.shape[0] / b[n] for n, m in after.named_modules() if n in b}


def prune(
    task: Task,
    model: nn.Module,
    keep_ratio: float,
    steps: int = 3,
    taylor_batches: int = 8,
    recovery_steps: int = 300,
    recovery_lr: float = 1e-3,
    round_to: int | None = None,
    progress: Callable[[str, float], None] | None = None,
) -> tuple[nn.Module, dict]:
    """Prune a copy of `model` to keep_ratio of its prunable channels, then recover by distillation."""
    teacher = model
    student = copy.deepcopy(model)
    device = next(student.parameters()).device
    example = to_device(task.example_inputs, device)
    setup = _setup(task, student)
    imp = AccumulatedTaylorImportance()
    pruner = tp.pruner.MetaPruner(
        student,
        example,
        importance=imp,
        pruning_ratio=1.0 - keep_ratio,
        iterative_steps=steps,
        ignored_layers=setup["ignored_layers"],
        num_heads=setup["num_heads"],
        prune_num_heads=bool(setup["num_heads"]),
        prune_head_dims=False,
        head_pruning_ratio=1.0 - keep_ratio,
        round_to=round_to,
    )
    batches = task.train_batches(seed=7)
    between = max(recovery_steps // (2 * steps), 1) if steps > 1 else 0
    for step in range(steps):
        imp.reset()
        student.eval()
        for t in range(taylor_batches):
            inputs, target = next(batches)
            student.zero_grad()
            _taylor_loss(
                task,
                student,
                to_device(inputs, device),
                None if target is None else target.to(device),
                step * taylor_batches + t,
            ).backward()
            imp.accumulate(student)
        pruner.step()
        student.zero_grad(set_to_none=True)
        _sync_attention_heads(student)
        if progress:
            progress("prune", (step + 1) / steps)
        if between and step < steps - 1:
            distill(task, student, teacher, between, recovery_lr, seed=100 + step)
    final_steps = recovery_steps - between * (steps - 1)
    if final_steps > 0:
        distill(
            task,
            student,
            teacher,
            final_steps,
            recovery_lr,
            seed=200,
            progress=(lambda f: progress("recover", f)) if progress else None,
        )
    info = {
        "method": "Torch-Pruning MetaPruner (DepGraph) with accumulated Taylor importance Σ|w·∂L/∂w|",
        "keep_ratio": keep_ratio,
        "iterative_steps": steps,
        "taylor_batches_per_step": taylor_batches,
        "recovery": f"{recovery_steps} steps of knowledge distillation from the original model",
        "pruned_heads": bool(setup["num_heads"]),
    }
    return student.eval(), info


def _sync_attention_heads(model: nn.Module) -> None:
    """After heads are removed, keep the attention modules' bookkeeping true to their Q/K/V widths."""
    for m in model.modules():
        if hasattr(m, "attention_head_size") and hasattr(m, "query"):
            m.num_attention_heads = m.query.out_features // m.attention_head_size
            m.all_head_size = m.query.out_features
