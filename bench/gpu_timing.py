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


def capture_graph(step, *args):
    """`step(*args)` (e.g. one decode step) captured as one torch.cuda.CUDAGraph, after two warm-up calls on
    a side stream (compilation happens there). Returns the graph and what the captured call returned (the
    tensors each replay writes)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.inference_mode():
        for _ in range(2):
            step(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph):
        out = step(*args)
    return graph, out


def graph_replay_ms(step, *args, warmup: int = 10, repeats: int = 100) -> float:
    """The median GPU time of a replay of `step(*args)` captured as one CUDA graph (`capture_graph`). It
    costs the GPU's time, not a Python call's."""
    graph, _ = capture_graph(step, *args)
    return cuda_median_ms(graph.replay, warmup=warmup, repeats=repeats)


def alternated_ms(graphs: dict, rounds: int, warmup: int = 10, repeats: int = 50) -> dict[str, list[float]]:
    """Per named graph, the median replay time of each of `rounds` rounds; within a round the graphs are timed
    in turn, so that a drift of the GPU's speed during the run (bench/graph_replay_drift.py) falls on all."""
    times: dict[str, list[float]] = {name: [] for name in graphs}
    for _ in range(rounds):
        for name, graph in graphs.items():
            times[name].append(round(cuda_median_ms(graph.replay, warmup=warmup, repeats=repeats), 4))
    return times


def fp8_bench_doc(bench: str, timing: str) -> dict | None:
    """The results document of an FP8 bench (date, GPU, versions, how it timed), or None after one line on
    stderr when this machine has no FP8 tensor cores (the bench then exits 2)."""
    from workers.compression.fp8_linear import kernel_available

    if not kernel_available("cuda" if torch.cuda.is_available() else "cpu"):
        print(f"{bench}: needs a CUDA GPU of compute capability 8.9+ (FP8 tensor cores)", file=sys.stderr)
        return None
    return {"bench": bench, "date": dt.datetime.now(dt.UTC).date().isoformat(), "device": torch.cuda.get_device_name(),
            "torch": torch.__version__, "python": platform.python_version(), "timing": timing, "results": {}}
