"""FP8 encoders whose activation scales are calibrated once (static) instead of measured on every
input, against the best bf16; on a GPU, prints one JSON object (issue 4's encoder latency goal).

    python bench/static_fp8_encoder.py [--models bert-base,minilm-l6] [--out F.json] [--variants A,B]

Why: session 6's FP8 encoders (`bench/fp8_encoder.py`) were 1.2-1.5x bf16's time with CUDA graphs,
because every Linear first measured its input's absolute maximum (a reduction) and then cast it (a
second pass) before its GEMM. With a scale per Linear fixed on calibration inputs, quantizing an
input is a multiply, a clamp and a cast, which the compiler can fuse into the kernel that produces the
input (LayerNorm, GELU); the GEMM then reads e4m3 and runs at FP8's doubled tensor-core rate. That
is how FP8 inference engines run (static activation scales).

Every variant but HF's runs the same encoder code (workers/compression/fast_encoder.py: the HF
BERT's embeddings, then each layer as one fused Q/K/V projection, scaled-dot-product attention,
output projection, LayerNorm, GELU MLP, LayerNorm); only its Linear layers differ. The bar is the
best bf16 of the two:

- `bf16 (HF)`: transformers' BertModel in bf16 (session 6's bar);
- `bf16 (fused QKV)`: fast_encoder.Encoder in bf16;
- `fp8 static, every Linear`: every Linear a StaticFp8Linear (e4m3 weight with one scale, input cast
  to e4m3 with a calibrated scale, cuBLASLt's tensor-wise FP8 GEMM with the bias in its epilogue);
- `fp8 static, MLP only (attention bf16)`: only the two MLP Linears of each layer in FP8.

The fp8 variants also pack the word-embedding table to int4_g64 (rows dequantized at lookup), as the
size goal (>= 4x smaller than fp32) needs. Input scales: the largest absolute input of each Linear
over the calibration inputs (MiniLM: its calibration sentences; bert-base: random ids of another
seed), times `--scale-margin`. Fidelity: mean cosine to fp32 (TF32 off) on held-out inputs (MiniLM:
its evaluation sentences; bert-base: 64 x 128 random ids).

Latency at batch 1, 8 and 64 x 128 tokens, median of CUDA-event timings after warm-up (`--modes`):
`reduce-overhead` (inductor's CUDA graphs), `graph` (compiled in the default mode, one forward
captured as one torch.cuda.CUDAGraph and replayed; variant after variant), `interleaved` (the same
graphs for every variant, replayed in turn, 50 rounds: fast_encoder.graph_latencies_ms, what the
compression runner uses). Each variant's best over the modes run is compared with the best bf16's.
`--profile VARIANTS` prints each one's CUDA kernels instead.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "bench"))  # after ROOT: bench/workers.py must not hide the package

import torch  # noqa: E402

from workers.compression import report  # noqa: E402
from workers.compression.fast_encoder import (  # noqa: E402
    Encoder,
    captured,
    fp8_static_encoder,
    linear_names,
    stored_formats,
)
from workers.compression.models import to_device  # noqa: E402

BATCHES = (1, 8, 64)
WORD = "int4_g64"
VARIANTS = {  # label: the Linear layers in FP8 (None: a bf16 bar), or "hf" for HF's own BertModel in bf16
    "bf16 (HF)": "hf",
    "bf16 (fused QKV)": None,
    "fp8 static, every Linear": "all",
    "fp8 static, MLP only (attention bf16)": "mlp",
}
SHORT = {"bf16": "bf16 (fused QKV)", "hf": "bf16 (HF)", "fp8": "fp8 static, every Linear",
         "fp8-mlp": "fp8 static, MLP only (attention bf16)"}


def fp8_names(enc: Encoder, which: str) -> list[str]:
    names = linear_names(enc)
    return names if which == "all" else [n for n in names if n.endswith((".fc1", ".fc2"))]


def build(which: str | None, fp32, fp32_enc: Encoder, calib: list[tuple], margin: float):
    if which == "hf":
        return copy.deepcopy(fp32).to(torch.bfloat16)
    if which is None:
        return copy.deepcopy(fp32_enc).to(torch.bfloat16)
    return fp8_static_encoder(fp32, calib, margin, fp8_layers=fp8_names(fp32_enc, which), word_format=WORD)


def size_of(which: str | None, fp32, fp32_enc: Encoder) -> int:
    """Stored bytes, as report.weight_bytes counts them (fast_encoder.stored_formats: Linears not in FP8
    in bf16, as they run; an fp8 weight with a scale per row, a few bytes more than these one-scale
    weights; biases, norms and the small embedding tables in fp32, which run in bf16: over-estimates)."""
    if which in (None, "hf"):
        return report.weight_bytes(fp32) // 2
    return report.weight_bytes(fp32, stored_formats(fp32, fp8_names(fp32_enc, which), WORD))


def calibration(task, name: str, device: str) -> tuple[list[tuple], str]:
    if name == "minilm-l6":
        return [to_device(b, device) for b in task.calib_batches], "MiniLM's calibration sentences"
    gen = torch.Generator().manual_seed(4242)
    ids = torch.randint(1000, 30522, (64, 128), generator=gen)
    return [(ids.to(device), torch.ones_like(ids).to(device))], \
        "64 x 128 random ids, seed 4242 (the timed and scored inputs use other seeds)"


def time_compiled(model, task, name: str, device: str, timer, how: str) -> dict:
    """Latency (ms) at each batch size, compiled `how`: `reduce-overhead` (inductor's CUDA graphs) or
    `graph` (compiled in the default mode, then one forward captured as one torch.cuda.CUDAGraph and
    replayed: no per-call Python or guard overhead at all)."""
    from fp8_encoder import inputs_for
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, mode="reduce-overhead" if how == "reduce-overhead" else None, dynamic=False)
    out = {"latency_ms": {}, "compile_and_time_s": {}}
    for batch in BATCHES:
        x = inputs_for(task, name, batch, device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            if how == "graph":
                ms = timer(captured(compiled, x).replay)
            else:
                ms = timer(lambda r=compiled, i=x: r(*i))
        out["latency_ms"][f"b{batch}x128"] = round(ms, 4)
        out["compile_and_time_s"][f"b{batch}x128"] = round(time.perf_counter() - t0, 1)
    out["inductor_counters"] = {k: v for k, v in counters["inductor"].items() if "cudagraph" in k}
    return out


def run(name: str, device: str, timer, only: set[str] | None, margin: float, out: dict, save,
        modes: tuple[str, ...] = ("reduce-overhead", "graph")) -> dict:
    from fp8_encoder import cosine, setup

    torch._dynamo.reset()
    began = time.perf_counter()
    task, fp32, batches, reference = setup(name, device)
    calib, calib_source = calibration(task, name, device)
    fp32_enc = Encoder(fp32).eval()
    check = cosine(fp32_enc, batches, reference)
    fp32_bytes = report.weight_bytes(fp32)
    out.update({"fp32_weight_bytes": fp32_bytes, "real_weights": task.real_weights, "scale_margin": margin,
                "encoder_matches_hf_fp32": check, "calibration": calib_source, "variants": {}})
    built = {}
    for label, which in VARIANTS.items():
        if only and label not in only and not label.startswith("bf16"):
            continue  # the bf16 bars always run
        size = size_of(which, fp32, fp32_enc)
        row = out["variants"][label] = {"weight_bytes": size, "x_smaller_than_fp32": round(fp32_bytes / size, 2)}
        try:
            model = build(which, fp32, fp32_enc, calib, margin)
            row["fidelity"] = cosine(model, batches, reference)
            for how in modes:
                if how != "interleaved":
                    row[how] = time_compiled(model, task, name, device, timer, how)
            built[label] = model
        except Exception as exc:  # noqa: BLE001 - a variant that fails says why, the rest go on
            row["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
        print(f"{name} {label} {json.dumps(row)}", file=sys.stderr, flush=True)
        torch._dynamo.reset()
        torch.cuda.empty_cache()
        save()
    if "interleaved" in modes and built:
        from fp8_encoder import inputs_for

        from workers.compression.fast_encoder import graph_latencies_ms

        for batch in BATCHES:
            x = inputs_for(task, name, batch, device)
            for label, ms in graph_latencies_ms(built, x).items():
                out["variants"][label].setdefault("interleaved", {"latency_ms": {}})["latency_ms"][
                    f"b{batch}x128"] = round(ms, 4)
            torch._dynamo.reset()
        for label in built:
            print(f"{name} {label} interleaved {out['variants'][label]['interleaved']}", file=sys.stderr, flush=True)
        save()

    def best(v):
        runs = [v[h]["latency_ms"] for h in modes if h in v]
        return {f"b{b}x128": min(r[f"b{b}x128"] for r in runs) for b in BATCHES} if runs else None

    out["best_ms"] = {k: best(v) for k, v in out["variants"].items() if best(v)}
    bf16 = [v for k, v in out["best_ms"].items() if k.startswith("bf16")]
    bar = {b: min(m[b] for m in bf16) for b in bf16[0]} if bf16 else {}
    out["best_bf16_ms"] = bar
    out["ratio_to_best_bf16"] = {k: {b: round(v[b] / bar[b], 3) for b in bar} for k, v in out["best_ms"].items()}
    out["goal_met"] = {
        k: v["x_smaller_than_fp32"] >= 4 and v.get("fidelity", 0) >= 0.99
        and all(r <= 1.0 for r in out["ratio_to_best_bf16"][k].values())
        for k, v in out["variants"].items() if k in out["ratio_to_best_bf16"] and not k.startswith("bf16")}
    out["wall_s"] = round(time.perf_counter() - began, 1)
    return out


def profile(name: str, device: str, labels: list[str], batches: list[int], margin: float) -> dict:
    """CUDA kernels of one forward of each variant, compiled without CUDA graphs (the same kernels),
    by total time: where the time goes."""
    from fp8_encoder import inputs_for, setup
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    task, fp32, _, _ = setup(name, device)
    calib, _ = calibration(task, name, device)
    fp32_enc = Encoder(fp32).eval()
    out = {}
    for label in labels:
        model = build(VARIANTS[label], fp32, fp32_enc, calib, margin)
        compiled = torch.compile(model, dynamic=False)
        for batch in batches:
            x = inputs_for(task, name, batch, device)
            with torch.inference_mode():
                for _ in range(3):
                    compiled(*x)
                torch.cuda.synchronize()
                with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(10):
                        compiled(*x)
                    torch.cuda.synchronize()
            rows = []
            for ev in prof.key_averages():
                us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
                if us > 0 and ev.count >= 10:
                    rows.append({"kernel": ev.key[:90], "per_forward": ev.count // 10,
                                 "us_per_forward": round(us / 10, 1)})
            rows.sort(key=lambda r: -r["us_per_forward"])
            out[f"{label} b{batch}"] = {"kernels_per_forward": sum(r["per_forward"] for r in rows),
                                        "kernel_us_per_forward": round(sum(r["us_per_forward"] for r in rows), 1),
                                        "top": rows[:14]}
            print(f"{name} {label} b{batch} {json.dumps(out[f'{label} b{batch}'])}", file=sys.stderr, flush=True)
        torch._dynamo.reset()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm-l6,bert-base")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--variants", help=f"comma list of {', '.join(SHORT)} (default: all)")
    parser.add_argument("--modes", default="reduce-overhead,graph",
                        help="compiled timings: reduce-overhead, graph (one captured CUDA graph per variant, "
                             "timed one variant after another) and/or interleaved (the same graphs, replayed "
                             "in turn: fast_encoder.graph_latencies_ms)")
    parser.add_argument("--scale-margin", type=float, default=1.0,
                        help="input scale = calibration amax x this / 448 (default 1.0)")
    parser.add_argument("--profile", help="comma list of variants (as --variants): their kernels, not timings")
    parser.add_argument("--profile-batches", default="1,64")
    args = parser.parse_args()
    from gpu_timing import cuda_median_ms, fp8_bench_doc

    doc = fp8_bench_doc("static_fp8_encoder",
                        f"modes {args.modes}: median of CUDA-event timings after warm-up (see the bench's doc)")
    if doc is None:
        return 2
    device = "cuda"  # fp8_bench_doc found FP8 tensor cores

    def save():
        if args.out:
            args.out.write_text(json.dumps(doc, indent=1) + "\n")

    if args.profile:
        for name in args.models.split(","):
            doc["results"][name] = {"profile": profile(name, device, [SHORT[v] for v in args.profile.split(",")],
                                                       [int(b) for b in args.profile_batches.split(",")],
                                                       args.scale_margin)}
            save()
        print(json.dumps(doc, indent=1))
        return 0
    only = {SHORT[v] for v in args.variants.split(",")} if args.variants else None
    for name in args.models.split(","):
        doc["results"][name] = {}
        run(name, device, cuda_median_ms, only, args.scale_margin, doc["results"][name], save,
            tuple(args.modes.split(",")))
        save()
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
