"""One decode projection at a time: time and bandwidth of each backend's matrix-vector product.

For the Llama-1B projection shapes (fused Q/K/V, O, fused gate/up, down, lm_head) and each weight
format, times PackedLinear on every backend that runs it (torch: inductor-compiled expression or
cuBLAS for 16-bit; tinygemm for int4; triton: triton_decode.gemv, plain and with the RMSNorm
prologue) with CUDA graphs, median of 200 after warm-up, and prints the effective bandwidth
(packed bytes read / time). This is the loop to iterate kernels on: a whole decode step hides which
projection is slow.

    python bench/decode_gemv.py --out bench/results/decode-gemv-DATE-h200.json
    python bench/decode_gemv.py --smoke      # tiny shapes on the CPU, eager: checks the code path
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from gpu_timing import cuda_median_ms  # noqa: E402

from workers.compression.decode import PackedLinear  # noqa: E402

# (name, rows, inputs) of Llama-1B (hidden 2048, 32/8 heads of 64, MLP 8192, vocabulary 32,000).
SHAPES = [
    ("qkv", 3072, 2048),
    ("o", 2048, 2048),
    ("gate_up", 16384, 2048),
    ("down", 2048, 8192),
    ("lm_head", 32000, 2048),
]
SMOKE_SHAPES = [("qkv", 96, 128), ("down", 64, 256)]
FORMATS = ["bf16", "int8", "fp8_e4m3", "int4_g128"]


def timed_ms(fn, cuda: bool, repeats: int = 200) -> float:
    if not cuda:
        import time

        t = time.perf_counter()
        for _ in range(3):
            fn()
        return (time.perf_counter() - t) / 3 * 1000
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()  # warm-up, autotuning and compilation happen outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        fn()
    return cuda_median_ms(graph.replay, warmup=3, repeats=repeats)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    cuda = not args.smoke
    dev = "cuda" if cuda else "cpu"
    doc = {
        "benchmark": "decode gemv",
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "setup": "one vector x one packed projection, CUDA graph of one call, median of 200",
        "rows": [],
        "errors": [],
    }
    for name, rows, cols in SMOKE_SHAPES if args.smoke else SHAPES:
        w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows + cols)).mul_(0.02).to(dev)
        x = torch.randn(cols, device=dev, dtype=torch.bfloat16)
        norm = torch.ones(cols, device=dev, dtype=torch.bfloat16)
        for fmt in FORMATS:
            for backend in ("torch", "tinygemm", "triton"):
                if backend == "tinygemm" and not (cuda and fmt.startswith("int4")):
                    continue
                if backend == "triton" and not cuda:
                    continue
                try:
                    layer = PackedLinear(w, fmt, torch.bfloat16, backend=backend)
                    calls = {"plain": lambda layer=layer, x=x: layer(x)}
                    if backend == "torch" and cuda:
                        calls = {"compiled": torch.compile(lambda layer=layer, x=x: layer(x), fullgraph=True)}
                    if backend == "triton":
                        calls = {
                            "plain": lambda layer=layer, x=x: layer.fused(x),
                            "rmsnorm prologue": lambda layer=layer, x=x, norm=norm: layer.fused(x, 1, norm),
                        }
                    for variant, fn in calls.items():
                        ms = timed_ms(fn, cuda)
                        doc["rows"].append(
                            {
                                "shape": name,
                                "rows": rows,
                                "inputs": cols,
                                "format": fmt,
                                "backend": backend,
                                "variant": variant,
                                "bytes": layer.nbytes(),
                                "us": round(ms * 1000, 2),
                                "gb_per_s": round(layer.nbytes() / (ms / 1000) / 1e9, 1),
                            }
                        )
                except Exception as exc:  # noqa: BLE001 - report and go on
                    doc["errors"].append(f"{name} {fmt} {backend}: {type(exc).__name__}: {exc}"[:400])
                if args.out:
                    args.out.write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
