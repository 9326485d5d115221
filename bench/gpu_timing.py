"""CUDA-event timing shared by the GPU benches (`python bench/X.py` puts bench/ on the path)."""

from __future__ import annotations

import statistics

import torch


def cuda_median_ms(fn, warmup: int = 5, repeats: int = 30) -> float:
    """Median wall time on the GPU of `fn()` over `repeats` calls, each bracketed by CUDA events,
    after `warmup` calls (compilation, autotuning, CUDA-graph capture happen there)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
