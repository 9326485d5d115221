"""The synthetic BERT task's labels and the held-out loss that benchmark runs compare by (pure logic, CPU)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from workers.training.loop import _null
from workers.training.models import LABEL_NOISE, Task, _noisy_mod8


def test_noisy_labels_are_id_mod_8_except_about_the_noise_share():
    ids = torch.randint(0, 30522, (64, 128), generator=torch.Generator().manual_seed(1))
    labels = _noisy_mod8(ids, torch.Generator().manual_seed(2))
    assert labels.min() >= 0
    assert labels.max() <= 7
    differs = (labels != ids % 8).float().mean().item()
    # A random label equals id mod 8 one time in 8, so 7/8 of the noisy share differs.
    assert abs(differs - LABEL_NOISE * 7 / 8) < 0.01
    again = _noisy_mod8(ids, torch.Generator().manual_seed(2))
    assert torch.equal(labels, again)  # the same seed gives the same labels: every run scores the same set


def test_eval_loss_is_the_mean_over_held_out_batches_and_restores_training_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3))
    x = [torch.randn(16, 4) for _ in range(3)]
    y = [torch.randint(0, 3, (16,)) for _ in range(3)]
    held = list(zip(x, y, strict=True))
    task = Task(model=model, synthetic=True, description="t", batches=held, held_out=held)
    model.train()
    got = task.eval_loss(model, _null())
    model.eval()
    with torch.no_grad():
        want = sum(nn.functional.cross_entropy(model(a), b).item() for a, b in held) / 3
    assert got == pytest.approx(want, rel=1e-6)  # evaluated without dropout (eval mode) ...
    model.train()
    task.eval_loss(model, _null())
    assert model.training  # ... and the model is handed back in training mode
    assert Task(model=model, synthetic=True, description="t").eval_loss(model, _null()) is None
