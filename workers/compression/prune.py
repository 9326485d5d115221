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


def removable_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Residual blocks with an identity shortcut (a ResNet bottleneck without downsample): the block computes
    relu(branch(x) + x) on an x that is itself a ReLU output, so replacing it by the identity is exactly
    what it computes when its branch outputs zero."""
    from workers.archs import Bottleneck

    return [(n, m) for n, m in model.named_modules() if isinstance(m, Bottleneck) and m.down is None]


def block_scores(task: Task, model: nn.Module, batches, device, count: int) -> dict[str, dict]:
    """Per removable block: gradient importance of its branch, its MACs, and importance per MAC.

    Importance is the first-order (Taylor) estimate of the loss change when the branch's output r is set to
    zero, |sum(r * dL/dr)|, accumulated as an absolute value over `count` batches; MACs are the block's
    convolutions' multiply-accumulates per sample. Blocks are dropped in order of importance per MAC, so
    that what is removed costs the most time for the least quality."""
    blocks = removable_blocks(model)
    importance = {name: 0.0 for name, _ in blocks}
    macs = {name: 0 for name, _ in blocks}
    counted: set[int] = set()
    handles = []

    def watch(name: str, block: nn.Module) -> None:
        def branch_out(_module, _inputs, out):
            if out.requires_grad:
                out.register_hook(
                    lambda g: importance.__setitem__(name, importance[name] + float((out.detach() * g).sum().abs()))
                )

        def conv_macs(module, _inputs, out):
            if id(module) in counted:  # once, from the first batch
                return
            counted.add(id(module))
            k = module.kernel_size[0] * module.kernel_size[1]
            macs[name] += out[0].numel() * module.in_channels // module.groups * k

        handles.append(block.bn3.register_forward_hook(branch_out))
        for conv in (block.conv1, block.conv2, block.conv3):
            handles.append(conv.register_forward_hook(conv_macs))

    for name, block in blocks:
        watch(name, block)
    try:
        model.eval()
        for t in range(count):
            inputs, target = next(batches)
            model.zero_grad()
            _taylor_loss(
                task, model, to_device(inputs, device), None if target is None else target.to(device), 50_000 + t
            ).backward()
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
    total = sum(importance.values()) or 1.0
    return {
        name: {
            "importance": importance[name] / total,
            "macs": macs[name],
            "per_gmac": importance[name] / total / max(macs[name] / 1e9, 1e-12),
        }
        for name, _ in blocks
    }


def drop_blocks(model: nn.Module, scores: dict[str, dict], count: int) -> list[str]:
    """Replace the `count` blocks of lowest importance per MAC by nn.Identity; returns their names."""
    if count > len(scores):
        raise ValueError(f"cannot drop {count} blocks: the model has {len(scores)} that may be removed")
    doomed = sorted(scores, key=lambda n: scores[n]["per_gmac"])[:count]
    modules = dict(model.named_modules())
    for name in doomed:
        parent, _, leaf = name.rpartition(".")
        setattr(modules[parent] if parent else model, leaf, nn.Identity())
    return sorted(doomed, key=lambda n: [int(x) if x.isdigit() else x for x in n.split(".")])


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
    drop: int = 0,
) -> tuple[nn.Module, dict]:
    """Prune a copy of `model`: first drop `drop` whole residual blocks (depth), then keep keep_ratio of the
    prunable channels of what is left (width); then recover by distillation."""
    teacher = model
    student = copy.deepcopy(model)
    device = next(student.parameters()).device
    example = to_device(task.example_inputs, device)
    batches = task.train_batches(seed=7)
    dropped, scores = [], {}
    if drop:
        scores = block_scores(task, student, batches, device, taylor_batches)
        dropped = drop_blocks(student, scores, drop)
        if progress:
            progress("prune", 0.0)
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
    if drop:
        info["dropped_blocks"] = dropped
        info["block_scores"] = {
            n: {k: round(v, 6) if isinstance(v, float) else v for k, v in sc.items()} for n, sc in scores.items()
        }
        info["depth_method"] = (
            "whole residual blocks replaced by the identity, lowest first by Taylor importance "
            "|sum(r * dL/dr)| of the branch output r per GMAC of the block"
        )
    return student.eval(), info


def _sync_attention_heads(model: nn.Module) -> None:
    """After heads are removed, keep the attention modules' bookkeeping true to their Q/K/V widths."""
    for m in model.modules():
        if hasattr(m, "attention_head_size") and hasattr(m, "query"):
            m.num_attention_heads = m.query.out_features // m.attention_head_size
            m.all_head_size = m.query.out_features
