"""Where one Llama-1B decode step spends its GPU time: kernels per step, by name, per variant.

Each variant (backend x weights) is DecodeLlama compiled without CUDA graphs (so that the profiler
sees every kernel), run 20 steps under torch.profiler; the JSON gives, per step, the number of
kernels, the summed kernel time, and the ten costliest kernel names with their share. With CUDA
graphs (bench/compression.py) the same kernels run back to back, without the launch gaps.

    python bench/llama_decode_profile.py --variants "torch:bf16,triton:int4,tinygemm:int4" --out X.json
    python bench/llama_decode_profile.py --graphs --tune --variants torch:bf16,triton:int4   # latency only
    python bench/llama_decode_profile.py --raw-graph --variants torch:bf16,triton:int4   # GPU time of one replay
    python bench/llama_decode_profile.py --raw-graph --variants triton+eager:int8,triton+pdl:int8   # with PDL
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from gpu_timing import cuda_median_ms, graph_replay_ms  # noqa: E402

from workers.compression.decode import DecodeLlama  # noqa: E402
from workers.compression.models import _build_llama  # noqa: E402
from workers.compression.quantize import quantizable_layers  # noqa: E402

STEPS = 20


def profile(lm, backend: str, weights: str, smoke: bool, graphs: bool = False, raw: bool = False) -> dict:
    how = backend.partition("+")[2]
    if not how.startswith("pdl"):
        return _profile(lm, backend, weights, smoke, graphs, raw)
    from workers.compression import triton_decode as td

    saved = dict(td.PDL_TRIGGER)
    try:
        if how != "pdl":
            td.PDL_TRIGGER.update(dict.fromkeys(td.PDL_TRIGGER, 2 if how == "pdl-late" else 1))
        names = {td.W16: "16-bit", td.W8_ROW: "8-bit", td.W4_GROUP: "int4", td.W4_WORDS: "int4 words",
                 td.W4A8_WORDS: "int4 words, int8 inputs"}
        trigger = {names[f]: "start" if t == 1 else "end" for f, t in td.PDL_TRIGGER.items()}
        return {**_profile(lm, backend, weights, smoke, graphs, raw), "pdl_next_kernel_launches_at": trigger}
    finally:
        td.PDL_TRIGGER.update(saved)


def _profile(lm, backend: str, weights: str, smoke: bool, graphs: bool, raw: bool) -> dict:
    """backend: a DecodeLlama backend, with "+eager" (not compiled: with --raw-graph the eager step is
    captured) or "+pdl" (triton only: eager, every kernel launched with programmatic dependent launch;
    "+pdl-early" / "+pdl-late": every product lets the next kernel launch at its start / once its
    sums are done, instead of triton_decode.PDL_TRIGGER's choice per format). weights: bf16, int4
    (int4_g128), int4a8 (int4_g128 with the products' input rounded to int8: W4A8) or any format every
    projection takes."""
    torch._dynamo.reset()
    fmt = "int4_g128" if weights in ("int4", "int4a8") else weights
    assignment = {} if weights == "bf16" else dict.fromkeys(quantizable_layers(lm), fmt)
    dev = lm.lm_head.weight.device
    name, _, how = backend.partition("+")
    dec = DecodeLlama(lm, assignment, max_len=512, dtype=torch.bfloat16, backend=name, pdl=how.startswith("pdl"),
                      int8_inputs=weights == "int4a8")
    mode = "reduce-overhead" if graphs and not raw else "default"
    eager = smoke or how in ("eager", "pdl", "pdl-early", "pdl-late")
    step = dec if eager else torch.compile(dec, mode=mode, fullgraph=True, dynamic=False)
    tok, pos = torch.tensor([123], device=dev), torch.tensor([511], device=dev)
    t = time.perf_counter()
    with torch.inference_mode():
        for _ in range(3):
            step(tok, pos)
    compile_s = time.perf_counter() - t
    if raw:
        # the compiled step (no cudagraph trees) captured by hand as one CUDA graph: a replay costs
        # the GPU's time, not the compiled module's Python call
        latency = graph_replay_ms(step, tok, pos)
        return {
            "backend": backend,
            "weights": weights,
            "weight_bytes": dec.weight_bytes(),
            "compile_s": round(compile_s, 1),
            "cuda_graphs": f"one torch.cuda.CUDAGraph of the {'eager' if eager else 'compiled'} step",
            "latency_ms_per_token": latency,
        }
    if graphs:
        with torch.inference_mode():
            latency = cuda_median_ms(lambda: step(tok, pos), warmup=10, repeats=100)
        return {
            "backend": backend,
            "weights": weights,
            "weight_bytes": dec.weight_bytes(),
            "compile_s": round(compile_s, 1),
            "cuda_graphs": True,
            "latency_ms_per_token": latency,
        }
    activities = [torch.profiler.ProfilerActivity.CPU]
    if dev.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as prof, torch.inference_mode():
        for _ in range(STEPS):
            step(tok, pos)
        if dev.type == "cuda":
            torch.cuda.synchronize()
    by_name: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if dev.type == "cuda" and e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        by_name[e.name][0] += 1
        by_name[e.name][1] += e.device_time_total if dev.type == "cuda" else e.cpu_time_total
    total_us = sum(v[1] for v in by_name.values()) / STEPS
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:10]
    return {
        "backend": backend,
        "weights": weights,
        "weight_bytes": dec.weight_bytes(),
        "compile_s": round(compile_s, 1),
        "kernels_per_step": sum(v[0] for v in by_name.values()) / STEPS,
        "kernel_us_per_step": round(total_us, 1),
        "top": [
            {
                "name": n[:120],
                "per_step": c / STEPS,
                "us_per_step": round(us / STEPS, 1),
                "share": round(us / STEPS / total_us, 3),
            }
            for n, (c, us) in top
        ],
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--variants", default="torch:bf16,triton:bf16,triton:int4,tinygemm:int4")
    p.add_argument("--out", type=Path)
    p.add_argument("--smoke", action="store_true", help="the small Llama on the CPU, eager (checks the code path)")
    p.add_argument("--graphs", action="store_true", help="time each variant with CUDA graphs instead of profiling")
    p.add_argument(
        "--raw-graph",
        action="store_true",
        help="time one hand-captured CUDA graph of the compiled step (without the compiled module's Python call)",
    )
    p.add_argument("--tune", action="store_true", help="inductor coordinate_descent_tuning (as bench/compression.py)")
    args = p.parse_args()
    dev = "cpu" if args.smoke else "cuda"
    if args.tune:
        torch._inductor.config.coordinate_descent_tuning = True
    lm = _build_llama(False, smoke=args.smoke).lm.to(dev, torch.bfloat16).eval()
    doc = {
        "benchmark": "llama-1b decode kernel profile",
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if dev == "cuda" else None,
        "setup": "batch 1, position 511 of a 512-token cache, "
        + (
            "the step (compiled, mode default; eager for +eager and +pdl variants) captured as one "
            "torch.cuda.CUDAGraph, median of 100 replays"
            if args.raw_graph
            else "compiled with CUDA graphs (reduce-overhead), median of 100"
            if args.graphs
            else "compiled without CUDA graphs, 20 steps profiled"
        )
        + f", coordinate_descent_tuning={args.tune}",
        # which tiles and int4 input load triton_decode used (a sweep's list, when DECODE_GEMV_TUNED names one)
        "decode_gemv_tuned": os.environ.get("DECODE_GEMV_TUNED"),
        "decode_int4_xload": os.environ.get("DECODE_INT4_XLOAD"),
        "variants": [],
        "errors": [],
    }
    for spec in args.variants.split(","):
        backend, weights = spec.split(":")
        if dev == "cpu" and not backend.startswith("torch"):
            continue
        try:
            graphs = (args.graphs or args.raw_graph) and not args.smoke
            doc["variants"].append(profile(lm, backend, weights, args.smoke, graphs, args.raw_graph and not args.smoke))
        except Exception as exc:  # noqa: BLE001 - report and go on with the next variant
            doc["errors"].append({"variant": spec, "error": f"{type(exc).__name__}: {exc}"[:500]})
        if args.out:
            args.out.write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
