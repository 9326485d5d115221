"""Checkpoints a requeued attempt resumes from: one file per rank (error-feedback residuals differ per
rank), written atomically, and a `latest` marker rank 0 moves only once every rank has written."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

KEEP = 2


def save(directory: str, rank: int, step: int, model, optimizer, reducer) -> None:
    root = Path(directory)
    step_dir = root / f"step-{step:08d}"
    step_dir.mkdir(parents=True, exist_ok=True)
    state = {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "reducer": reducer.state_dict() if reducer is not None else None}
    tmp = step_dir / f".rank{rank}.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, step_dir / f"rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        marker = root / ".latest.tmp"
        marker.write_text(str(step))
        os.replace(marker, root / "latest")
        for old in sorted(root.glob("step-*"))[:-KEEP]:
            shutil.rmtree(old, ignore_errors=True)


WEIGHTS = "model.safetensors"


def export_weights(directory: str, step: int, model, name: str) -> Path:
    """The trained weights alone, as safetensors beside the step's checkpoint (rank 0, at the end of a run):
    what the job hands its users. The checkpoints themselves (torch.save, with the optimizer and residuals)
    stay on the node for a resumed attempt. Tied weights (GPT-2's head) are stored once."""
    from safetensors.torch import save_model

    step_dir = Path(directory) / f"step-{step:08d}"
    step_dir.mkdir(parents=True, exist_ok=True)
    tmp = step_dir / f".{WEIGHTS}.tmp"
    save_model(model, str(tmp), metadata={"model": name, "step": str(step)})
    os.replace(tmp, step_dir / WEIGHTS)
    return step_dir / WEIGHTS


def load(directory: str, rank: int, model, optimizer, reducer) -> int:
    """Restore the newest complete checkpoint; returns the step to continue from (0 when there is none)."""
    root = Path(directory)
    marker = root / "latest"
    if not marker.exists():
        return 0
    step = int(marker.read_text().strip())
    path = root / f"step-{step:08d}" / f"rank{rank}.pt"
    if not path.exists():  # a resize: weights are the same on every rank, residuals start afresh
        path = root / f"step-{step:08d}" / "rank0.pt"
        residuals = False
    else:
        residuals = True
    state = torch.load(path, map_location=next(model.parameters()).device, weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if reducer is not None and residuals and state.get("reducer"):
        reducer.load_state_dict(state["reducer"])
    return int(state["step"])
