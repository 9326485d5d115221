"""Encoders with weight-only low-bit Linears dequantized inside the GEMM by the compiler, against the best
bf16, on a GPU; prints one JSON object (an experiment toward issue 4's encoder latency goal).

The idea: keep each Linear's packed weight (quantize.pack's int8 / fp8_e4m3 / int4 formats) and write
y = x @ dequant(q).T (* row scale) + bias as plain tensor operations (`FusedDequantLinear` below).
Under `torch.compile` with max-autotune and inductor's Triton GEMM templates only, inductor fuses the
element-wise dequantization into the template's prologue (`torch._inductor.config.prologue_fusion`)
and the row scale and bias into its epilogue, so the product would read the low-bit codes and run at
bf16's tensor-core rate with no kernel added per layer. `FusedDequantEmbedding` gathers the packed rows
of the looked-up tokens and dequantizes only those. The arithmetic is quantize.unpack's. Measured on
the H200 (2026-11-29), it did not pay: see docs/compression.md, "Weight-only Linears fused by the
compiler", and `bench/results/fused-encoder-2026-11-29-h200-minilm-partial.json`.

    python bench/fused_encoder.py [--models minilm-l6,bert-base] [--variants A,B] [--kernel-probe] [--out F.json]

For each encoder, batch 1, 8 and 64 x 128 tokens, median of 30 CUDA-event timings after warm-up
(compilation, autotuning and CUDA-graph capture happen in the warm-up):

- `bf16, reduce-overhead`: the model cast to bf16, inductor + CUDA graphs (the issue's bar);
- `bf16, max-autotune`: the same with inductor's GEMM autotuning (cuBLAS and Triton templates), so
  that the bar has every advantage the quantized variants get;
- `fused int8 + int4 word embeddings`: every Linear in the engine's int8 format (one scale per output
  row), the word embedding table in int4_g64; compiled by `compile_fused` below (max-autotune,
  Triton GEMM templates with the dequantization in their prologue, CUDA graphs);
- `fused fp8 + int4 word embeddings`: the same with e4m3 weights (weight-only: bf16 products);
- `fused int4_g64 + int4 word embeddings`: every Linear in int4, round-to-nearest.

Fidelity is the mean cosine of the eager outputs to fp32's (TF32 off), MiniLM on its real evaluation
sentences, BERT-base (random weights) on 64 x 128 random tokens; `compiled_max_abs_diff` compares the
compiled and eager outputs of the timed inputs. Weight bytes are the packed formats' (report.weight_bytes).
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import math
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "bench"))  # after ROOT: bench/workers.py must not hide the package

import torch  # noqa: E402
from fp8_encoder import BATCHES, cosine, inputs_for, linears, setup, word_embeddings  # noqa: E402
from torch import nn  # noqa: E402

from workers.compression import report  # noqa: E402
from workers.compression.quantize import pack, parse_format, set_module  # noqa: E402

FORMATS = ("int8", "fp8_e4m3", "int4")


def _padded_cols(cols: int, group: int) -> tuple[int, int]:
    g = min(group, cols)
    return g, math.ceil(cols / g) * g


class _Packed(nn.Module):
    """The packed tensors of one (rows, cols) weight as buffers, and their dequantization."""

    def __init__(self, packed: dict[str, torch.Tensor], fmt: str, rows: int, cols: int, dtype: torch.dtype):
        super().__init__()
        kind, group = parse_format(fmt)
        if kind not in FORMATS:
            raise ValueError(f"no fused dequantization for format {fmt!r} (only int8, fp8_e4m3, int4_gN)")
        self.fmt, self.kind, self.rows, self.cols, self.dtype = fmt, kind, rows, cols, dtype
        if kind == "int4":
            self.group, self.padded = _padded_cols(cols, group)
            if self.padded % 2:
                raise ValueError("int4 rows must hold an even number of codes")
            self.register_buffer("q", packed["q"].reshape(rows, self.padded // 2).contiguous())
            self.register_buffer("scale", packed["scale"].reshape(rows, -1).contiguous())  # fp16, as stored
            self.register_buffer("zero", packed["zero"].reshape(rows, -1).contiguous())
        else:
            q = packed["q"].reshape(rows, cols)
            self.register_buffer("q", q.view(torch.float8_e4m3fn) if kind == "fp8_e4m3" else q.contiguous())
            self.register_buffer("scale", packed["scale"].reshape(rows).float().contiguous())

    def values(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The weight in `dtype`, of all rows or of the rows indexed by `rows`: int4 fully dequantized
        (code * scale + minimum, per group; padded columns cut off); int8 and e4m3 as codes, without
        their row scale (the caller applies it: to the output, for a Linear)."""
        q = self.q if rows is None else self.q[rows]
        if self.kind != "int4":
            return q.to(self.dtype)
        scale = self.scale if rows is None else self.scale[rows]
        zero = self.zero if rows is None else self.zero[rows]
        n = q.shape[0]
        codes = torch.stack([q & 0x0F, q >> 4], dim=-1).reshape(n, self.padded // self.group, self.group)
        # In fp32, like quantize.unpack, then rounded once to `dtype` (in registers, when fused).
        w = codes.float().mul(scale.float()[:, :, None]).add(zero.float()[:, :, None])
        w = w.reshape(n, self.padded).to(self.dtype)
        return w if self.padded == self.cols else w[:, : self.cols]


class FusedDequantLinear(nn.Module):
    """A Linear computing from its packed low-bit weight; see the module doc."""

    def __init__(self, packed: dict[str, torch.Tensor], fmt: str, in_features: int, out_features: int,
                 bias: torch.Tensor | None, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        self.weight_packed = _Packed(packed, fmt, out_features, in_features, dtype)
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.weight_packed
        y = torch.nn.functional.linear(x.to(self.dtype), p.values())
        if p.kind != "int4":
            # The row scale commutes with the product: applied to the output, in the GEMM's epilogue.
            y = (y.float() * p.scale).to(self.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{self.weight_packed.fmt} weight-only (dequantized in the GEMM's prologue when compiled)")


class FusedDequantEmbedding(nn.Module):
    """An Embedding whose table is packed; a lookup dequantizes only the rows it gathers."""

    def __init__(self, packed: dict[str, torch.Tensor], fmt: str, layer: nn.Embedding,
                 dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.num_embeddings, self.embedding_dim = layer.weight.shape
        self.padding_idx = layer.padding_idx
        self.table = _Packed(packed, fmt, self.num_embeddings, self.embedding_dim, dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t, flat = self.table, ids.reshape(-1)
        rows = t.values(flat)
        if t.kind != "int4":
            rows = (rows.float() * t.scale[flat][:, None]).to(t.dtype)
        return rows.reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.table.fmt} (rows dequantized at lookup)"


def swap_fused(model: nn.Module, packed: dict[str, dict[str, torch.Tensor]], formats: dict[str, str],
               dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """Replace each Linear / Embedding named in `packed` by its fused-dequantization module, on the
    layer's device; returns the names replaced."""
    modules = dict(model.named_modules())
    done = []
    for name, tensors in packed.items():
        layer, fmt = modules[name], formats[name]
        device = layer.weight.device
        tensors = {k: v.to(device) for k, v in tensors.items()}
        if isinstance(layer, nn.Linear):
            new = FusedDequantLinear(tensors, fmt, layer.in_features, layer.out_features, layer.bias, dtype)
        elif isinstance(layer, nn.Embedding):
            new = FusedDequantEmbedding(tensors, fmt, layer, dtype)
        else:
            raise ValueError(f"{name} is neither a Linear nor an Embedding layer")
        set_module(model, name, new)
        done.append(name)
    return done


def compile_fused(model: nn.Module, cuda_graphs: bool = True):
    """`torch.compile` with inductor's max-autotune and Triton GEMM templates only, so that no layer
    falls back to cuBLAS behind a separate dequantizing kernel."""
    options = {"max_autotune": True, "max_autotune_gemm_backends": "TRITON", "prologue_fusion": True,
               "triton.cudagraphs": cuda_graphs}
    return torch.compile(model, dynamic=False, options=options)


WORD = "int4_g64"
VARIANTS = {
    # label: (Linear format or None for bf16, compile mode; None = compile_fused)
    "bf16, reduce-overhead": (None, "reduce-overhead"),
    "bf16, max-autotune": (None, "max-autotune"),
    "fused int8 + int4 word embeddings": ("int8", None),
    "fused fp8 + int4 word embeddings": ("fp8_e4m3", None),
    "fused int4_g64 + int4 word embeddings": ("int4_g64", None),
}


def assignment_for(fp32, fmt: str) -> dict[str, str]:
    return {**{n: fmt for n in linears(fp32)}, **{n: WORD for n in word_embeddings(fp32)}}


def build(fp32, bf16, fmt: str | None):
    if fmt is None:
        return bf16
    model = copy.deepcopy(bf16)
    fp32_layers = dict(fp32.named_modules())
    formats = assignment_for(fp32, fmt)
    swap_fused(model, {n: pack(fp32_layers[n].weight, f) for n, f in formats.items()}, formats)
    return model


def encoder(name: str, device: str, timer, only: set[str] | None, save=lambda partial: None) -> dict:
    torch._dynamo.reset()
    began = time.perf_counter()
    task, fp32, batches, reference = setup(name, device)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    fp32_bytes = report.weight_bytes(fp32)
    out = {"fp32_weight_bytes": fp32_bytes, "real_weights": task.real_weights, "variants": {}}
    for label, (fmt, mode) in VARIANTS.items():
        if only and label not in only and not label.startswith("bf16"):
            continue
        size = fp32_bytes // 2 if fmt is None else report.weight_bytes(fp32, assignment_for(fp32, fmt))
        row = out["variants"][label] = {"weight_bytes": size, "x_smaller_than_fp32": round(fp32_bytes / size, 2)}
        model = build(fp32, bf16, fmt)
        row["fidelity"] = cosine(model, batches, reference)
        compiled = torch.compile(model, mode=mode, dynamic=False) if mode else compile_fused(model)
        row["latency_ms"], row["compile_s"], row["compiled_max_abs_diff"] = {}, {}, {}
        for batch in BATCHES:
            x = inputs_for(task, name, batch, device)
            key = f"b{batch}x128"

            def step(r=compiled, i=x):
                with torch.inference_mode():
                    return r(*i)

            try:
                t0 = time.perf_counter()
                got = step().float()
                torch.cuda.synchronize()
                row["compile_s"][key] = round(time.perf_counter() - t0, 1)
                with torch.inference_mode():
                    want = model(*x).float()
                row["compiled_max_abs_diff"][key] = round((got - want).abs().max().item(), 4)
                row["latency_ms"][key] = round(timer(step), 4)
            except Exception as exc:  # noqa: BLE001 - a variant that fails says why, the rest go on
                row["latency_ms"][key] = None
                row["latency_ms"][f"{key}_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            print(f"{name} {label} {key} {row['latency_ms'].get(key)} ms (compile {row['compile_s'].get(key)} s) "
                  f"fidelity {row['fidelity']} size x{row['x_smaller_than_fp32']}", file=sys.stderr, flush=True)
        torch._dynamo.reset()
        del model, compiled
        torch.cuda.empty_cache()
        save(out)  # a run cut by its time limit keeps the variants it finished
    bars = [v["latency_ms"] for k, v in out["variants"].items() if k.startswith("bf16")]
    out["best_bf16_ms"] = {f"b{b}x128": min((m[f"b{b}x128"] for m in bars if m.get(f"b{b}x128")), default=None)
                           for b in BATCHES}
    out["goals"] = {}
    for label, row in out["variants"].items():
        if label.startswith("bf16"):
            continue
        lat = row["latency_ms"]
        out["goals"][label] = {
            "weights_ge_4x_smaller": row["x_smaller_than_fp32"] >= 4,
            "fidelity_ge_0.99": row["fidelity"] >= 0.99,
            "latency_vs_best_bf16": {k: (round(lat[k] / bar, 3) if lat.get(k) and bar else None)
                                     for k, bar in out["best_bf16_ms"].items()},
        }
    out["wall_s"] = round(time.perf_counter() - began, 1)
    return out


def kernel_probe() -> dict:
    """The CUDA kernels of one call of a fused 384 -> 1536 Linear on 1,024 tokens, compiled without CUDA
    graphs so that the profiler sees them: is the dequantization really inside the GEMM template?"""
    from torch.profiler import ProfilerActivity, profile

    out = {}
    for fmt in ("int8", "int4_g64"):
        layer = nn.Linear(384, 1536).cuda()
        fused = FusedDequantLinear(pack(layer.weight, fmt), fmt, 384, 1536, layer.bias).cuda()
        compiled = compile_fused(fused, cuda_graphs=False)
        x = torch.randn(1024, 384, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            compiled(x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            compiled(x)
            torch.cuda.synchronize()
        out[fmt] = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
        print(fmt, "kernels per call:", out[fmt], file=sys.stderr, flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm-l6,bert-base")
    parser.add_argument("--variants", help="comma list of quantized variant labels (the bf16 bars always run)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--kernel-probe", action="store_true", help="first list one fused Linear's kernels per call")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("fused_encoder: needs a CUDA GPU (inductor's Triton GEMM templates)", file=sys.stderr)
        return 2
    from gpu_timing import cuda_median_ms

    doc = {"bench": "fused_encoder", "date": dt.datetime.now(dt.UTC).date().isoformat(),
           "device": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
           "timing": "median of 30 CUDA-event timings after 5 warm-ups", "results": {}}
    only = set(args.variants.split(",")) if args.variants else None
    if args.kernel_probe:
        doc["kernel_probe"] = kernel_probe()

    def save(partial=None, name=None):
        if partial is not None:
            doc["results"][name] = partial
        if args.out:
            args.out.write_text(json.dumps(doc, indent=1) + "\n")

    for name in args.models.split(","):
        doc["results"][name] = encoder(name, "cuda", cuda_median_ms, only, lambda p, n=name: save(p, n))
        save()
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
