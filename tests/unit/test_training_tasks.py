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


@pytest.mark.parametrize(("argv", "expected"), [
    (["--hcof", "off", "--nodes", "2"], True),  # the DDP baselines
    (["--hcof", "inter_node=none", "--nodes", "2"], True),  # one level, nothing compressed: DDP's reducer
    (["--hcof", "intra_node=none", "--procs-per-node", "4"], True),
    (["--hcof", "inter_node=bf16", "--nodes", "2"], False),  # a codec to run: HCOF's reducer
    (["--hcof", "inter_node=none,critical=bf16", "--nodes", "2"], False),
    (["--hcof", "inter_node=none", "--nodes", "2", "--procs-per-node", "2"], False),  # two levels: the hierarchy
    (["--hcof", "inter_node=none", "--nodes", "2", "--inter-backend", "gloo", "--backend", "nccl"], False),
])
def test_hcof_hands_a_single_uncompressed_level_to_ddps_reducer(argv, expected):
    from workers.training.cli import parse
    from workers.training.loop import ddp_engine

    cfg = parse(["--model", "digits-mlp", *argv])
    cfg.args.backend = cfg.args.backend or "gloo"
    cfg.args.inter_backend = cfg.args.inter_backend or cfg.args.backend
    assert ddp_engine(cfg) is expected
