"""One decode projection at a time: time and bandwidth of each backend's matrix-vector product.

For the Llama-1B projection shapes (fused Q/K/V, O, fused gate/up, down, lm_head) and each weight
format, times PackedLinear on every backend that runs it (torch: cuBLAS for 16-bit, and with
`--compiled` inductor's expression for the low-bit formats; tinygemm for int4; triton:
triton_decode.gemv, plain and fused as the decoder calls it: RMSNorm prologue for Q/K/V,
gate/up and lm_head, SiLU(gate) * up epilogue for gate/up, residual add for O and down) and prints
the effective bandwidth (packed bytes read / time).

Timing: one CUDA graph holds the product over C copies of the weight one after another (C such that
the copies hold >= 256 MB, so that no call finds its weight in the 50 MB L2; 8 <= C <= 64); the time
per product is the graph's median replay time over 20 replays / C. That is a product's cost inside a
captured decode step, launch gap included, without the graph's own launch.

`--sweep` times triton_decode's GEMV over a list of tiles (rows per program, inputs per step,
warps, stages) per shape and format, as the decoder calls it, and lists the best
tile per shape under "best": what `triton_decode.TUNED` holds (`DECODE_GEMV_TUNED=sweep.json` makes
triton_decode take a sweep's list instead).

    python bench/decode_gemv.py --out bench/results/decode-gemv-DATE-h200.json
    python bench/decode_gemv.py --sweep --out bench/results/decode-gemv-sweep-DATE-h200.json
    python bench/decode_gemv.py --smoke      # tiny shapes on the CPU, eager: checks the code path
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from workers.compression.decode import PackedLinear  # noqa: E402

# (name, rows, inputs) of Llama-1B (hidden 2048, 32/8 heads of 64, MLP 8192, vocabulary 32,000).
SHAPES = [
    ("qkv", 3072, 2048),
    ("o", 2048, 2048),
    ("gate_up", 16384, 2048),
    ("down", 2048, 8192),
    ("lm_head", 32000, 2048),
]
SMOKE_SHAPES = [("qkv", 96, 128), ("gate_up", 128, 128), ("down", 64, 256)]
FORMATS = ["bf16", "int8", "fp8_e4m3", "int4_g128"]
SWEEP_FORMATS = ["int4_g128", "int4_g128_words", "int4_g128_a8", "int8", "bf16"]
# (rows per program, inputs per step, warps, stages)
SWEEP = {
    "int4_g128": [
        (2, 2048, 4, 3), (4, 512, 4, 3), (4, 1024, 4, 3), (4, 2048, 4, 3), (8, 256, 4, 3), (8, 512, 4, 3),
        (8, 1024, 4, 3), (8, 1024, 8, 3), (16, 256, 4, 3), (16, 512, 4, 3), (16, 512, 8, 3), (32, 256, 8, 3),
        (32, 512, 8, 3), (4, 2048, 8, 3), (8, 2048, 8, 3), (16, 1024, 8, 3),
    ],
    # int4 over interleaved words (triton_decode.int4_words, _w4w_kernel); stages do not apply
    "int4_g128_words": [
        (4, 2048, 2, 1), (8, 2048, 2, 1), (8, 2048, 4, 1), (4, 2048, 4, 1), (16, 2048, 2, 1), (2, 2048, 2, 1),
        (8, 2048, 1, 1), (4, 2048, 1, 1), (16, 2048, 1, 1), (8, 4096, 2, 1), (4, 4096, 2, 1), (8, 4096, 1, 1),
        (16, 512, 4, 1), (32, 1024, 8, 1),
    ],
    # the same words, the input rounded to int8 and multiplied with dp4a (W4A8, _w4a8_kernel)
    "int4_g128_a8": [
        (4, 1024, 1, 1), (8, 1024, 1, 1), (8, 2048, 1, 1), (8, 2048, 2, 1), (16, 1024, 1, 1), (16, 1024, 2, 1),
        (4, 2048, 2, 1), (8, 512, 1, 1), (16, 2048, 2, 1), (4, 4096, 4, 1), (8, 4096, 2, 1), (2, 2048, 1, 1),
        (32, 1024, 2, 1), (16, 512, 1, 1), (4, 2048, 1, 1), (16, 2048, 4, 1),
    ],
    "int8": [
        (2, 2048, 4, 1), (2, 2048, 4, 3), (4, 1024, 4, 3), (4, 512, 4, 3), (8, 512, 4, 3), (8, 1024, 4, 3),
        (16, 512, 4, 3), (16, 256, 4, 3), (32, 256, 8, 3),
    ],
    "bf16": [
        (2, 1024, 4, 3), (2, 512, 4, 3), (4, 1024, 4, 3), (4, 512, 4, 3), (8, 512, 4, 3), (8, 256, 4, 3),
        (16, 256, 4, 3), (16, 512, 8, 3),
    ],
}


def copies_for(nbytes: int) -> int:
    return max(8, min(64, math.ceil(256e6 / nbytes)))


def graph_ms(fns, repeats: int = 20) -> float:
    """Median time of one CUDA-graph replay of fns one after another, / len(fns)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            for fn in fns:
                fn()  # warm-up: compilation happens outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return statistics.median(times) / len(fns)


def cpu_ms(fns) -> float:
    t = time.perf_counter()
    for fn in fns:
        fn()
    return (time.perf_counter() - t) / len(fns) * 1000


def fused_call(name: str, layer: PackedLinear, x, norm, res):
    """The projection as DecodeLlama's triton backend calls it (`norm` None: a norm of ones, not read)."""
    from workers.compression import triton_decode as td

    if name in ("qkv", "lm_head"):
        return lambda: layer.fused(x, td.RMSNORM, norm)
    if name == "gate_up":
        return lambda: layer.fused(x, td.RMSNORM, norm, epilogue=td.SILU_PAIR)
    return lambda: layer.fused(x, residual=res)


def row(name, rows, cols, fmt, backend, variant, nbytes, ms, **extra) -> dict:
    return {
        "shape": name,
        "rows": rows,
        "inputs": cols,
        "format": fmt,
        "backend": backend,
        "variant": variant,
        "bytes": nbytes,
        "us": round(ms * 1000, 2),
        "gb_per_s": round(nbytes / (ms / 1000) / 1e9, 1),
        **extra,
    }


def sweep(doc: dict, out: Path | None, formats: list[str] | None = None, xloads: list[int] | None = None,
          shapes: list[str] | None = None, grid: dict[str, list[int]] | None = None, tuned: bool = False) -> None:
    """`xloads`: for int4, also each of triton_decode's ways of loading the input (INT4_XLOAD), as a
    fifth element of the tile. `shapes`: only these. `grid`: instead of SWEEP's list, every combination
    of rows per program, inputs per step, warps and stages (keys bn, bk, warps, stages). `tuned`: only
    the tile triton_decode takes now (TUNED), as a baseline in the same run."""
    import itertools

    from workers.compression import triton_decode as td

    codes = {"int4_g128": td.W4_GROUP, "int4_g128_words": td.W4_WORDS, "int4_g128_a8": td.W4A8_WORDS,
             "int8": td.W8_ROW, "bf16": td.W16}
    best = {}
    for name, rows, cols in SHAPES:
        if shapes and name not in shapes:
            continue
        w = torch.randn(rows, cols, device="cuda").mul_(0.02)
        x = torch.randn(cols, device="cuda", dtype=torch.bfloat16)
        norm = None  # the Llama's norms are ones, which DecodeLlama does not pass (RMSNORM_UNIT)
        for fmt in formats or SWEEP_FORMATS:
            words, td.INT4_WORDS = td.INT4_WORDS, fmt.endswith(("_words", "_a8"))
            try:
                base = PackedLinear(w, fmt.removesuffix("_words").removesuffix("_a8"), torch.bfloat16,
                                    backend="triton", int8_inputs=fmt.endswith("_a8"))
            finally:
                td.INT4_WORDS = words
            layers = [base]
            for _ in range(copies_for(base.nbytes()) - 1):
                c = PackedLinear.__new__(PackedLinear)
                c.__dict__.update(base.__dict__)
                c._buffers = {k: v.clone() for k, v in base._buffers.items()}
                layers.append(c)
            res = torch.randn(rows // 2 if name == "gate_up" else rows, device="cuda", dtype=torch.bfloat16)
            tried = set()
            tiles = (list(itertools.product(grid["bn"], grid["bk"], grid["warps"], grid["stages"],
                                            *([grid["maxnreg"]] if "maxnreg" in grid else [])))
                     if grid else SWEEP[fmt])
            if tuned:
                code = codes[fmt]
                n_out = rows // 2 if name == "gate_up" else rows
                tiles = [td.gemv_config(code, n_out, cols, td.SILU_PAIR if name == "gate_up" else 0)]
            if xloads and fmt == "int4_g128":
                tiles = [(*t, m) for t in tiles for m in xloads]
            for cfg in tiles:
                k = cols
                bk = max(min(cfg[1], k), 128 if fmt.startswith("int4") else 1)
                cfg = (cfg[0], bk, *cfg[2:])
                if cfg in tried:
                    continue
                tried.add(cfg)
                orig = td.gemv_config
                td.gemv_config = lambda *a, cfg=cfg, **kw: cfg  # noqa: B023 - bound by the default
                try:
                    ms = graph_ms([fused_call(name, lay, x, norm, res) for lay in layers])
                except Exception as exc:  # noqa: BLE001 - report and go on
                    doc["errors"].append(f"sweep {name} {fmt} {cfg}: {type(exc).__name__}: {exc}"[:300])
                    continue
                finally:
                    td.gemv_config = orig
                r = row(name, rows, cols, fmt, "triton", "fused", base.nbytes(), ms, config=list(cfg))
                doc["rows"].append(r)
                key = f"{fmt} {name}"
                if key not in best or r["us"] < best[key]["us"]:
                    best[key] = r
            del layers
            torch.cuda.empty_cache()
            if out:
                out.write_text(json.dumps(doc, indent=1))
    doc["best"] = [
        {
            "shape": v["shape"],
            "format": v["format"],
            "fmt": codes[v["format"]],
            "n": v["rows"] // 2 if v["shape"] == "gate_up" else v["rows"],
            "k": v["inputs"],
            "epi": td.SILU_PAIR if v["shape"] == "gate_up" else 0,
            "config": v["config"],
            "us": v["us"],
            "gb_per_s": v["gb_per_s"],
        }
        for v in best.values()
    ]
    if out:
        out.write_text(json.dumps(doc, indent=1))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--sweep", action="store_true", help="time the Triton GEMV over a list of tiles per shape")
    p.add_argument("--compiled", action="store_true", help="also inductor's expressions for low-bit formats (slow)")
    p.add_argument("--formats", help=f"with --sweep: a comma-separated subset of {','.join(SWEEP_FORMATS)}")
    p.add_argument("--xloads", help="with --sweep: int4 tiles also with each of these input loads (e.g. 0,1,2)")
    p.add_argument("--shapes", help="with --sweep: a comma-separated subset of the shapes (qkv,o,gate_up,down,lm_head)")
    p.add_argument("--tuned", action="store_true", help="with --sweep: only the tile triton_decode takes now")
    p.add_argument("--grid", help="with --sweep: every tile of a grid, e.g. 'bn=8,16;bk=256,512;warps=4,8;stages=2,3'")
    args = p.parse_args()
    formats = args.formats.split(",") if args.formats else None
    if formats and not set(formats) <= set(SWEEP_FORMATS):
        p.error(f"--formats: choose from {', '.join(SWEEP_FORMATS)}")
    xloads = [int(v) for v in args.xloads.split(",")] if args.xloads else None
    shapes = args.shapes.split(",") if args.shapes else None
    if shapes and not set(shapes) <= {name for name, _, _ in SHAPES}:
        p.error(f"--shapes: choose from {', '.join(name for name, _, _ in SHAPES)}")
    grid = None
    if args.grid:
        try:
            grid = {key: [int(v) for v in values.split(",")]
                    for key, values in (part.split("=") for part in args.grid.split(";"))}
        except ValueError:
            p.error("--grid: expected bn=8,16;bk=256,512;warps=4,8;stages=2,3")
        if not {"bn", "bk", "warps", "stages"} <= set(grid) <= {"bn", "bk", "warps", "stages", "maxnreg"}:
            p.error("--grid needs bn, bk, warps and stages (and, for int4 words, maxnreg: 0 for no cap)")
    cuda = not args.smoke
    dev = "cuda" if cuda else "cpu"
    doc = {
        "benchmark": "decode gemv sweep" if args.sweep else "decode gemv",
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "setup": "one vector x one packed projection; one CUDA graph over C >= 8 copies of the weight "
        "(>= 256 MB together, so none is read from L2), median of 20 replays / C",
        "rows": [],
        "errors": [],
    }
    if args.sweep:
        sweep(doc, args.out, formats, xloads, shapes, grid, args.tuned)
        print(json.dumps(doc, indent=1))
        return 0
    for name, rows, cols in SMOKE_SHAPES if args.smoke else SHAPES:
        w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows + cols)).mul_(0.02).to(dev)
        x = torch.randn(cols, device=dev, dtype=torch.bfloat16)
        norm = torch.ones(cols, device=dev, dtype=torch.bfloat16)
        res = torch.randn(rows // 2 if name == "gate_up" else rows, device=dev, dtype=torch.bfloat16)
        for fmt in FORMATS:
            for backend in ("torch", "tinygemm", "triton"):
                if backend == "tinygemm" and not (cuda and fmt.startswith("int4")):
                    continue
                if backend == "triton" and not cuda:
                    continue
                if backend == "torch" and cuda and fmt != "bf16" and not args.compiled:
                    continue
                try:
                    base = PackedLinear(w, fmt, torch.bfloat16, backend=backend)
                    layers = [base]
                    if cuda:
                        layers += [PackedLinear(w, fmt, torch.bfloat16, backend=backend)
                                   for _ in range(copies_for(base.nbytes()) - 1)]
                    if backend == "triton":
                        calls = {
                            "plain": [lambda lay=lay, x=x: lay.fused(x) for lay in layers],
                            "fused": [fused_call(name, lay, x, norm, res) for lay in layers],
                        }
                    elif backend == "torch" and cuda and fmt != "bf16":
                        mods = torch.nn.ModuleList(layers)
                        compiled = torch.compile(lambda mods=mods, x=x: [m(x) for m in mods], fullgraph=True)
                        calls = {"compiled": [compiled]}
                    else:
                        calls = {"plain": [lambda lay=lay, x=x: lay(x) for lay in layers]}
                    for variant, fns in calls.items():
                        if cuda:
                            ms = graph_ms(fns) * len(fns) / len(layers)
                        else:
                            ms = cpu_ms(fns)
                        doc["rows"].append(row(name, rows, cols, fmt, backend, variant, base.nbytes(), ms))
                    del layers, calls
                except Exception as exc:  # noqa: BLE001 - report and go on
                    doc["errors"].append(f"{name} {fmt} {backend}: {type(exc).__name__}: {exc}"[:400])
                if cuda:
                    torch.cuda.empty_cache()
                if args.out:
                    args.out.write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
