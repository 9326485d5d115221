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


def fp8_bench_doc(bench: str, timing: str) -> dict | None:
    """The results document of an FP8 bench (date, GPU, versions, how it timed), or None after one line on
    stderr when this machine has no FP8 tensor cores (the bench then exits 2)."""
    from workers.compression.fp8_linear import kernel_available

    if not kernel_available("cuda" if torch.cuda.is_available() else "cpu"):
        print(f"{bench}: needs a CUDA GPU of compute capability 8.9+ (FP8 tensor cores)", file=sys.stderr)
        return None
    return {"bench": bench, "date": dt.datetime.now(dt.UTC).date().isoformat(), "device": torch.cuda.get_device_name(),
            "torch": torch.__version__, "python": platform.python_version(), "timing": timing, "results": {}}
