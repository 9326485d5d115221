"""CUDA-event timing shared by the GPU benches (`python bench/X.py` puts bench/ on the path)."""

from __future__ import annotations

import datetime as dt
import platform
import statistics
import sys

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


def graph_replay_ms(step, *args, warmup: int = 10, repeats: int = 100) -> float:
    """`step(*args)` (e.g. one decode step) captured as one torch.cuda.CUDAGraph, after two warm-up calls on
    a side stream (compilation happens there); the median GPU time of a replay. It costs the GPU's time,
    not a Python call's."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.inference_mode():
        for _ in range(2):
            step(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph):
        step(*args)
    return cuda_median_ms(graph.replay, warmup=warmup, repeats=repeats)


def fp8_bench_doc(bench: str, timing: str) -> dict | None:
    """The results document of an FP8 bench (date, GPU, versions, how it timed), or None after one line on
    stderr when this machine has no FP8 tensor cores (the bench then exits 2)."""
    from workers.compression.fp8_linear import kernel_available

    if not kernel_available("cuda" if torch.cuda.is_available() else "cpu"):
        print(f"{bench}: needs a CUDA GPU of compute capability 8.9+ (FP8 tensor cores)", file=sys.stderr)
        return None
    return {"bench": bench, "date": dt.datetime.now(dt.UTC).date().isoformat(), "device": torch.cuda.get_device_name(),
            "torch": torch.__version__, "python": platform.python_version(), "timing": timing, "results": {}}
