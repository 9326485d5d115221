"""Recovery fine-tuning by knowledge distillation from the original (unpruned) model."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .models import Task, to_device


def kd_loss(
    task: Task,
    student_out: torch.Tensor,
    teacher_out: torch.Tensor,
    target: torch.Tensor | None,
    temperature: float = 4.0,
    alpha: float = 0.7,
) -> torch.Tensor:
    """Classifiers: Hinton's softened KL plus cross-entropy on labels. Embedders: 1 - cosine plus MSE."""
    if task.kind == "classifier":
        t = temperature
        soft = (
            F.kl_div(F.log_softmax(student_out / t, dim=1), F.softmax(teacher_out / t, dim=1), reduction="batchmean")
            * t
            * t
        )
        hard = (
            F.cross_entropy(student_out, target) if target is not None else torch.zeros((), device=student_out.device)
        )
        return alpha * soft + (1 - alpha) * hard
    s = student_out.reshape(-1, student_out.shape[-1]).float()
    te = teacher_out.reshape(-1, teacher_out.shape[-1]).float()
    return (1 - F.cosine_similarity(s, te, dim=1)).mean() + F.mse_loss(s, te)


def distill(
    task: Task,
    student: nn.Module,
    teacher: nn.Module,
    steps: int,
    lr: float,
    seed: int = 1,
    progress: Callable[[float], None] | None = None,
) -> nn.Module:
    device = next(student.parameters()).device
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    batches = task.train_batches(seed)
    student.train()
    teacher.eval()
    for step in range(steps):
        inputs, target = next(batches)
        inputs = to_device(inputs, device)
        with torch.no_grad():
            teacher_out = teacher(*inputs)
        loss = kd_loss(task, student(*inputs), teacher_out, None if target is None else target.to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if progress and (step % 10 == 0 or step == steps - 1):
            progress((step + 1) / steps)
    return student.eval()
