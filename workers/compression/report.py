"""Measurements that go into a report: parameters, MACs, weight bytes, latency."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from .models import to_device
from .quantize import FULL, estimate_bytes, quantizable_layers


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def macs(model: nn.Module, example_inputs: tuple) -> int:
    """Multiply-accumulates of one forward pass, as Torch-Pruning's op counter sees it.

    It counts Conv/Linear/norm layers by hooks; attention's own matmuls (QK^T, PV) are not layers
    and are not counted.
    """
    import torch_pruning as tp

    device = next(model.parameters()).device
    count, _ = tp.utils.count_ops_and_params(model, example_inputs=to_device(example_inputs, device))
    return int(count)


def weight_bytes(model: nn.Module, assignment: dict[str, str] | None = None) -> int:
    """Bytes of the state dict as stored: fp32 for unassigned tensors, packed size for assigned weights."""
    assignment = assignment or {}
    weights_of = {f"{name}.weight": fmt for name, fmt in assignment.items()}
    seen: set[int] = set()
    total = 0
    for key, value in model.state_dict().items():
        if value.data_ptr() in seen and value.numel() > 0:
            continue
        seen.add(value.data_ptr())
        fmt = weights_of.get(key)
        if fmt is not None and fmt != FULL:
            total += estimate_bytes(tuple(value.shape), fmt)
        elif value.is_floating_point():
            total += value.numel() * 4
        else:
            total += value.numel() * value.element_size()
    return total


@torch.inference_mode()
def paired_latency_ms(models: list[nn.Module], example_inputs: tuple, warmup: int = 2, repeats: int = 7) -> list[float]:
    """Median forward time of each model, runs interleaved so that a shared CPU's load hits all alike."""
    device = next(models[0].parameters()).device
    inputs = to_device(example_inputs, device)
    cuda = device.type == "cuda"
    for m in models:
        for _ in range(warmup):
            m(*inputs)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(repeats):
        for i, m in enumerate(models):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            m(*inputs)
            if cuda:
                torch.cuda.synchronize()
            times[i].append((time.perf_counter() - start) * 1000)
    return [statistics.median(t) for t in times]


@torch.inference_mode()
def latency_ms(model: nn.Module, example_inputs: tuple, warmup: int = 3, repeats: int = 10) -> float:
    """Median wall time of one forward pass (CUDA: synchronised)."""
    device = next(model.parameters()).device
    inputs = to_device(example_inputs, device)
    cuda = device.type == "cuda"
    for _ in range(warmup):
        model(*inputs)
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(*inputs)
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def layer_rows(
    model: nn.Module, assignment: dict[str, str], sens: dict[str, dict[str, float]] | None, kept: dict[str, float]
) -> list[dict]:
    rows = []
    for name, layer in quantizable_layers(model).items():
        fmt = assignment.get(name, FULL)
        by_format = (sens or {}).get(name, {})
        rows.append(
            {
                "name": name,
                "format": fmt,
                "sensitivity": by_format.get(fmt, 0.0) if fmt != FULL else 0.0,
                "sensitivity_by_format": by_format,
                "bytes": estimate_bytes(tuple(layer.weight.shape), fmt),
                "kept": kept.get(name, 1.0),
                "shape": list(layer.weight.shape),
            }
        )
    return rows
