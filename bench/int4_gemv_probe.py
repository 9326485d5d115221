# ruff: noqa: B023 - the closures are called within the loop iteration that makes them
"""Probe: does a packed-int4 GEMV from a kernel library reach memory speed on the Llama-1B shapes?

For each decode projection shape, times one vector x one int4_g128 weight (the codes, scales and
minimums that `quantize.pack` produces, as they are) on:
- bf16 cuBLAS (`F.linear`) — the bar;
- tinygemm (`aten._weight_int4pack_mm`, PyTorch's int4 kernel; scale and z' rounded to bf16);
- gemlite's Triton GEMV (`GemLiteLinearTriton`, RevSplit-K at batch 1), with bf16 input (meta data
  rounded to bf16) and with fp16 input (our fp16 scales exact; x cast to fp16), with --gemlite;
- triton_decode's own int4 GEMV (bytes, the decoder's);
and checks each product against the fp32 product with the dequantized weight (max error relative
to the output's largest magnitude). Timing is decode_gemv's: one CUDA graph over >= 8 copies
(>= 256 MB, nothing read from L2), median of 20 replays / copies.

    python bench/int4_gemv_probe.py [--gemlite] --out bench/results/int4-gemv-probe-DATE-h200.json

Measured on the H200 (2026-11-29): gemlite 0.6.0.post2 reaches 0.5-1.6 TB/s, no faster than tinygemm
(`int4-gemv-probe-2026-11-29-h200-gemlite.json`). A W4_WORDS layout for triton_decode's GEMV, which
turns two nibbles into an f16x2 pair with one lop3 and multiplies on the f16x2 units in inline PTX
(Marlin's trick; about 2.3 instructions a weight instead of 6), computed correctly but was no faster
than the byte kernel either (0.2-1.3 TB/s over nine tiles, `int4-gemv-probe-2026-11-29-h200-f16x2.json`):
the int4 products are not bound by their dequantizing instructions. That kernel was left out of
triton_decode; it is in commit 9dbea82 (`git show 9dbea82:workers/compression/triton_decode.py`),
and this script times it when triton_decode has W4_WORDS.
"""

from __future__ import annotations

import argparse
import datetime as dt
import inspect
import json
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from decode_gemv import SHAPES, copies_for, graph_ms  # noqa: E402

from workers.compression.int4_linear import int4_codes, tinygemm_pack  # noqa: E402
from workers.compression.quantize import pack, unpack  # noqa: E402

GROUP = 128
# (rows per program, inputs per step, warps, stages) tried for W4_WORDS
CONFIGS = [
    (8, 1024, 4, 3),
    (16, 512, 4, 3),
    (16, 1024, 8, 3),
    (32, 512, 8, 3),
    (4, 2048, 4, 3),
    (8, 512, 4, 2),
    (32, 256, 4, 3),
    (64, 256, 8, 3),
    (16, 256, 4, 4),
]


def gemlite_layer(packed: dict, rows: int, cols: int, dtype: torch.dtype):
    import gemlite
    from gemlite import DType

    dt_ = DType.BF16 if dtype == torch.bfloat16 else DType.FP16
    layer = gemlite.GemLiteLinearTriton(
        W_nbits=4, group_size=GROUP, in_features=cols, out_features=rows, input_dtype=dt_, output_dtype=dt_
    )
    scale = packed["scale"].float().reshape(rows, cols // GROUP)
    minimum = packed["zero"].float().reshape(rows, cols // GROUP)
    # ours: w = q * s + m; gemlite's fma mode: w = q * s + (-z * s), so z = -m / s.
    zeros = (-minimum / scale).to(dtype)
    layer.pack(int4_codes(packed["q"], rows), scale.to(dtype), zeros, bias=None)
    return layer


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path)
    p.add_argument("--gemlite", action="store_true", help="also gemlite (pip install gemlite==0.6.0.post2)")
    p.add_argument("--h100-config", action="store_true", help="load gemlite's H100 tile table instead of autotuning")
    args = p.parse_args()
    doc = {
        "benchmark": "int4 gemv probe",
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(),
        "setup": "one vector x one int4_g128 weight (quantize.pack's codes as they are); one CUDA graph over "
        ">= 8 copies (>= 256 MB), median of 20 replays / copies; err = max |y - y_ref| / max |y_ref|, "
        "y_ref the fp32 product with the dequantized weight",
        "rows": [],
        "errors": [],
    }
    try:
        import triton

        doc["triton"] = triton.__version__
        if not args.gemlite:
            raise ImportError("not asked for (--gemlite)")
        import gemlite

        doc["gemlite"] = gemlite.__version__
        if args.h100_config:
            import os

            cfg = os.path.join(os.path.dirname(gemlite.__file__), "configs", "h100.json")
            doc["gemlite_config"] = cfg if gemlite.load_config(cfg) else "failed"
    except Exception as exc:  # noqa: BLE001
        doc["errors"].append(f"import gemlite: {exc}")
    for name, rows, cols in SHAPES:
        g = torch.Generator().manual_seed(rows + cols)
        w = torch.randn(rows, cols, generator=g).mul_(0.02).cuda()
        packed = pack(w, f"int4_g{GROUP}")
        deq = unpack(packed, f"int4_g{GROUP}", (rows, cols))
        int4_bytes = sum(t.numel() * t.element_size() for t in packed.values())
        x = torch.randn(cols, device="cuda", dtype=torch.bfloat16)
        ref = deq @ x.float()
        copies = copies_for(int4_bytes)

        def record(variant, fn_list, y, nbytes, ref=ref):
            err = ((y.float().reshape(-1) - ref).abs().max() / ref.abs().max()).item()
            ms = graph_ms(fn_list)
            doc["rows"].append(
                {
                    "shape": name,
                    "rows": rows,
                    "inputs": cols,
                    "variant": variant,
                    "bytes": nbytes,
                    "us": round(ms * 1000, 2),
                    "gb_per_s": round(nbytes / (ms / 1000) / 1e9, 1),
                    "rel_err": round(err, 5),
                }
            )
            print(doc["rows"][-1], flush=True)

        try:
            wb = [w.to(torch.bfloat16) for _ in range(copies_for(w.numel() * 2))]
            record(
                "bf16 cuBLAS", [lambda t=t: F.linear(x[None], t) for t in wb], F.linear(x[None], wb[0]), w.numel() * 2
            )
            del wb
            q = packed["q"].reshape(rows, cols // GROUP, GROUP // 2)
            tiny = [tinygemm_pack(q, packed["scale"], packed["zero"], rows, GROUP) for _ in range(copies)]
            fns = [lambda t=t: torch.ops.aten._weight_int4pack_mm(x[None], t[0], GROUP, t[1]) for t in tiny]
            record("int4 tinygemm", fns, fns[0](), int4_bytes)
            del tiny, fns
        except Exception as exc:  # noqa: BLE001
            doc["errors"].append(f"{name} baseline: {type(exc).__name__}: {exc}"[:400])
        try:
            from workers.compression import triton_decode as td

            q = packed["q"].reshape(rows, cols // GROUP, GROUP // 2).contiguous()
            sc = packed["scale"].reshape(rows, -1).contiguous()
            mn = packed["zero"].reshape(rows, -1).contiguous()
            qs = [q.clone() for _ in range(copies)]
            fns = [lambda t=t: td.gemv(x, t, rows, td.W4_GROUP, torch.bfloat16, sc, mn, GROUP) for t in qs]
            record("int4 triton bytes (tuned)", fns, fns[0](), int4_bytes)
            del qs, fns
            if "asm" not in inspect.signature(td.gemv).parameters:
                # the f16x2 kernel of commit 9dbea82 (see the module's docstring); today's W4_WORDS is
                # another kernel, timed by bench/decode_gemv.py --sweep --formats int4_g128_words
                continue
            words = td.int4_words(packed["q"].reshape(rows, cols // 2))
            ws = [words.clone() for _ in range(copies)]
            plain = td.gemv(x, words, rows, td.W4_WORDS, torch.float32, sc, mn, GROUP, asm=False)
            record_err = ((plain - ref).abs().max() / ref.abs().max()).item()
            doc.setdefault("words_plain_err", {})[name] = round(record_err, 6)
            for cfg in CONFIGS:
                bk = min(cfg[1], cols)
                cfg = (cfg[0], bk, cfg[2], cfg[3])
                fns = [
                    lambda t=t, cfg=cfg: td.gemv(x, t, rows, td.W4_WORDS, torch.bfloat16, sc, mn, GROUP, config=cfg)
                    for t in ws
                ]
                y = fns[0]()
                d = ((y.float() - plain).abs().max() / plain.abs().max()).item()
                record(f"int4 triton words asm {list(cfg)}", fns, y, int4_bytes)
                doc["rows"][-1]["vs_plain"] = round(d, 6)
            del ws, fns
        except Exception as exc:  # noqa: BLE001
            doc["errors"].append(f"{name} triton words: {type(exc).__name__}: {exc}"[:1500])
            traceback.print_exc()
        for dtype in (torch.bfloat16, torch.float16) if args.gemlite else ():
            try:
                layers = [gemlite_layer(packed, rows, cols, dtype) for _ in range(copies)]
                xin = x.to(dtype)[None]
                fns = [lambda lay=lay: lay(xin) for lay in layers]
                y = fns[0]()
                record(f"int4 gemlite {str(dtype).split('.')[-1]}", fns, y, int4_bytes)
                del layers, fns
            except Exception as exc:  # noqa: BLE001
                doc["errors"].append(f"{name} gemlite {dtype}: {type(exc).__name__}: {exc}"[:600])
                traceback.print_exc()
        torch.cuda.empty_cache()
        if args.out:
            args.out.write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
