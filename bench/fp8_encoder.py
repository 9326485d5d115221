"""Encoders with FP8 tensor-core Linears (W8A8, workers/compression/fp8_linear.py) against the best bf16,
on a GPU; prints one JSON object (issue 4's encoder goals).

    python bench/fp8_encoder.py [--models bert-base,minilm-l6] [--out F.json] [--no-diagnose]

For each encoder, batch 1, 8 and 64 x 128 tokens, median of 30 CUDA-event timings after warm-up
(compilation and CUDA-graph capture happen in the warm-up), each variant eager and compiled with
`reduce-overhead` (inductor + CUDA graphs):

- `bf16`: the model cast to bf16 (the bar);
- `fp8-w8a8`: every Linear's weight packed to the engine's `fp8_e4m3` format (e4m3, one scale per
  output row) and executed by Fp8Linear (input quantized per token, `torch._scaled_mm`);
- `fp8-w8a8 + int4 word embeddings`: the same with the word embedding table packed to int4_g64 (its
  lookups read the dequantized table: the GPU time is bf16's, the size is the packed one; the position
  and token-type tables are tiny, and int4 there shifts every token, so they stay bf16);
- `torchao float8 dynamic, per row`: torchao's Float8DynamicActivationFloat8WeightConfig(PerRow()).

Fidelity is the mean cosine of the outputs to fp32's (TF32 off) on the 64 x 128 inputs (MiniLM: its
real evaluation sentences). Weight bytes are the packed formats' (report.weight_bytes).

With `--diagnose` (default on for bert-base), the session-5 puzzle: every Linear and embedding at
int4_g128 with GPTQ rounding, scored (a) simulated in fp32, (b) simulated then cast to bf16, (c)
executed by the engine's kernels (apply_torchao: int4 on tinygemm at the packed grid since session 6;
torchao's own int4 in session 6's first run), on the same inputs — which step loses fidelity.
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
from workers.compression.fp8_linear import swap_fp8_linears  # noqa: E402
from workers.compression.gptq import collect_hessians  # noqa: E402
from workers.compression.models import make_task, to_device  # noqa: E402
from workers.compression.quantize import Rounding, apply_simulated, apply_torchao, pack, quantizable_layers  # noqa: E402

BATCHES = (1, 8, 64)


def inputs_for(task, name: str, batch: int, device: str) -> tuple:
    if name == "minilm-l6":
        ids, mask = task.example_inputs
        reps = -(-batch // ids.shape[0])
        return ids.repeat(reps, 1)[:batch].to(device), mask.repeat(reps, 1)[:batch].to(device)
    gen = torch.Generator().manual_seed(batch)
    return (torch.randint(1000, 30522, (batch, 128), generator=gen).to(device),
            torch.ones(batch, 128, dtype=torch.long).to(device))


def fidelity_batches(task, name: str, device: str) -> list[tuple]:
    if name == "minilm-l6":
        return [to_device(b, device) for b in task.eval_batches]
    return [inputs_for(task, name, 64, device)]


@torch.inference_mode()
def cosine(model, batches, reference) -> float:
    sims = []
    for b, r in zip(batches, reference, strict=True):
        o = model(*b).float()
        flat_o, flat_r = o.reshape(-1, o.shape[-1]), r.reshape(-1, r.shape[-1])
        sims.append(torch.nn.functional.cosine_similarity(flat_o, flat_r, dim=1))
    return round(torch.cat(sims).mean().item(), 5)


def linears(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def embeddings(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)]


WORD_EMBEDDING_FORMAT = "int4_g64"  # the word table only: position and token-type tables are tiny and shift every token


def word_embeddings(model) -> list[str]:
    return [n for n in embeddings(model) if n.endswith("word_embeddings")]


def fp8_model(fp32, bf16, with_int4_embeddings: bool):
    model = copy.deepcopy(bf16)
    fp32_layers = dict(fp32.named_modules())
    packed = {n: pack(fp32_layers[n].weight, "fp8_e4m3") for n in linears(fp32)}
    swap_fp8_linears(model, packed)
    if with_int4_embeddings:
        layers = dict(model.named_modules())
        sim = apply_simulated(copy.deepcopy(fp32), {n: WORD_EMBEDDING_FORMAT for n in word_embeddings(fp32)})
        sim_layers = dict(sim.named_modules())
        with torch.no_grad():
            for n in word_embeddings(fp32):
                layers[n].weight.copy_(sim_layers[n].weight.to(torch.bfloat16))
    return model


class TensorwiseFp8Linear(torch.nn.Module):
    """Experiment: one scale for the whole weight and one for the whole input (cuBLASLt's native FP8 GEMM)
    instead of row x token scales. Not the engine's format (its rows have their own scales)."""

    def __init__(self, layer: torch.nn.Linear):
        super().__init__()
        w = layer.weight.detach().float()
        scale = w.abs().amax().clamp(min=1e-12) / 448.0
        self.register_buffer("qweight", (w / scale).clamp(-448, 448).to(torch.float8_e4m3fn))
        self.register_buffer("scale", scale.reshape(()))
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().to(torch.bfloat16))
        self.out_features = w.shape[0]

    def forward(self, x):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        x_scale = x2.abs().amax().float().clamp(min=1e-12) / 448.0
        xq = (x2.float() / x_scale).clamp(-448, 448).to(torch.float8_e4m3fn)
        y = torch._scaled_mm(xq, self.qweight.t(), scale_a=x_scale, scale_b=self.scale, out_dtype=torch.bfloat16,
                             use_fast_accum=True)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)


def tensorwise_model(fp32, bf16):
    model = copy.deepcopy(bf16)
    modules = dict(model.named_modules())
    for name in linears(fp32):
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else model, child, TensorwiseFp8Linear(dict(fp32.named_modules())[name]))
    return model


def time_variant(model, task, name, device, mode, timer) -> dict:
    runner = model if mode is None else torch.compile(model, mode=mode, dynamic=False)
    out = {}
    for batch in BATCHES:
        x = inputs_for(task, name, batch, device)

        def step(r=runner, i=x):
            with torch.inference_mode():
                r(*i)

        try:
            out[f"b{batch}x128"] = round(timer(step), 4)
        except Exception as exc:  # noqa: BLE001 - a variant that fails says why, the rest go on
            out[f"b{batch}x128"] = None
            out[f"b{batch}x128_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return out


def setup(name: str, device: str) -> tuple:
    """The task, its fp32 model on `device`, the fidelity inputs and fp32's outputs on them (TF32 off)."""
    task = make_task(name)
    fp32 = task.model.to(device).eval()
    batches = fidelity_batches(task, name, device)
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.inference_mode():
        reference = [fp32(*b).float() for b in batches]
    return task, fp32, batches, reference


def encoder(name: str, device: str, timer, diagnose: bool, only: set[str] | None = None,
            compiled_only: bool = False) -> dict:
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    torch._dynamo.reset()
    began = time.perf_counter()
    task, fp32, batches, reference = setup(name, device)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    lin = linears(fp32)
    fp32_bytes = report.weight_bytes(fp32)
    sizes = {
        "bf16": fp32_bytes // 2,
        "fp8-w8a8": report.weight_bytes(fp32, {n: "fp8_e4m3" for n in lin}),
        "fp8-w8a8 + int4 word embeddings": report.weight_bytes(
            fp32, {**{n: "fp8_e4m3" for n in lin}, **{n: WORD_EMBEDDING_FORMAT for n in word_embeddings(fp32)}}),
        "torchao float8 dynamic, per row": report.weight_bytes(fp32, {n: "fp8_e4m3" for n in lin}),
        "fp8-w8a8 per-tensor scales (experiment)": report.weight_bytes(fp32, {n: "fp8_e4m3" for n in lin}),
    }

    def torchao_fp8():
        m = copy.deepcopy(bf16)
        quantize_(m, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
                  filter_fn=lambda mod, fqn: isinstance(mod, torch.nn.Linear))
        return m

    builders = {
        "bf16": lambda: bf16,
        "fp8-w8a8": lambda: fp8_model(fp32, bf16, False),
        "fp8-w8a8 + int4 word embeddings": lambda: fp8_model(fp32, bf16, True),
        "torchao float8 dynamic, per row": torchao_fp8,
        "fp8-w8a8 per-tensor scales (experiment)": lambda: tensorwise_model(fp32, bf16),
    }
    if only:
        builders = {k: v for k, v in builders.items() if k in only or k == "bf16"}
    out = {"fp32_weight_bytes": fp32_bytes, "real_weights": task.real_weights, "variants": {}}
    for label, build in builders.items():
        row = out["variants"][label] = {"weight_bytes": sizes[label],
                                        "x_smaller_than_fp32": round(fp32_bytes / sizes[label], 2)}
        try:
            model = build()
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            continue
        row["fidelity"] = cosine(model, batches, reference)
        row["latency_ms"] = {}
        for mode in ("reduce-overhead",) if compiled_only else (None, "reduce-overhead"):
            key = "eager" if mode is None else "compile-reduce-overhead"
            row["latency_ms"][key] = time_variant(model, task, name, device, mode, timer)
            print(f"{name} {label} {key} {row['latency_ms'][key]} fidelity {row['fidelity']}",
                  file=sys.stderr, flush=True)
        torch._dynamo.reset()
        del model
        torch.cuda.empty_cache()

    def best(label):
        lat = out["variants"][label].get("latency_ms", {})
        return {f"b{b}x128": min((m[f"b{b}x128"] for m in lat.values() if m.get(f"b{b}x128") is not None), default=None)
                for b in BATCHES}

    out["best_ms"] = {label: best(label) for label in builders}
    goal_row = out["variants"].get("fp8-w8a8 + int4 word embeddings")
    if goal_row is not None:
        ours, bar = out["best_ms"]["fp8-w8a8 + int4 word embeddings"], out["best_ms"]["bf16"]
        out["goals"] = {
            "weights_ge_4x_smaller": goal_row["x_smaller_than_fp32"] >= 4,
            "fidelity_ge_0.99": bool(goal_row.get("fidelity") and goal_row["fidelity"] >= 0.99),
            "latency_le_best_bf16": {b: (ours[b] is not None and bar[b] is not None and ours[b] <= bar[b])
                                     for b in ours},
        }
    if diagnose:
        out["gptq_int4_diagnosis"] = diagnosis(task, fp32, batches, reference, device)
    out["wall_s"] = round(time.perf_counter() - began, 1)
    return out


def diagnosis(task, fp32, batches, reference, device) -> dict:
    """Every Linear (the pooler too) and embedding at int4_g128 with GPTQ: where does fidelity go?"""
    fit, _ = task.gptq_split()
    rounding = Rounding(collect_hessians(quantizable_layers(fp32), lambda: [fp32(*to_device(b, device)) for b in fit]))
    assignment = {n: "int4_g128" for n in linears(fp32) + embeddings(fp32)}
    linear_only = {n: "int4_g128" for n in linears(fp32)}
    out = {}
    sim = apply_simulated(copy.deepcopy(fp32), assignment, rounding)
    out["simulated_fp32"] = cosine(sim, batches, reference)
    out["simulated_fp32_linears_only"] = cosine(apply_simulated(copy.deepcopy(fp32), linear_only, rounding),
                                                batches, reference)
    out["simulated_then_bf16"] = cosine(copy.deepcopy(sim).to(torch.bfloat16), batches, reference)
    executed, simulated_layers = apply_torchao(copy.deepcopy(fp32).to(torch.bfloat16), assignment, device, rounding)
    out["executed"] = cosine(executed, batches, reference)
    out["executed_simulated_layers"] = len(simulated_layers)
    out["executed_kernels"] = sorted({type(m).__name__ for m in executed.modules()
                                      if type(m).__name__ in ("Int4Linear", "Fp8Linear", "Linear")})
    executed2, _ = apply_torchao(copy.deepcopy(fp32).to(torch.bfloat16), linear_only, device, rounding)
    out["executed_linears_only"] = cosine(executed2, batches, reference)
    return out


def diagnose_only(name: str, device: str) -> dict:
    began = time.perf_counter()
    task, fp32, batches, reference = setup(name, device)
    out = {"gptq_int4_diagnosis": diagnosis(task, fp32, batches, reference, device)}
    out["wall_s"] = round(time.perf_counter() - began, 1)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="bert-base,minilm-l6")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--no-diagnose", action="store_true")
    parser.add_argument("--variants", help="comma list of variant labels to run (bf16 always runs)")
    parser.add_argument("--compiled-only", action="store_true", help="time only the reduce-overhead builds")
    parser.add_argument("--diagnose-only", action="store_true", help="only the GPTQ int4 diagnosis (bert-base)")
    args = parser.parse_args()
    from gpu_timing import cuda_median_ms, fp8_bench_doc

    doc = fp8_bench_doc("fp8_encoder", "median of 30 CUDA-event timings after 5 warm-ups")
    if doc is None:
        return 2
    device = "cuda"  # fp8_bench_doc found FP8 tensor cores
    for name in args.models.split(","):
        diagnose = not args.no_diagnose and name == "bert-base"
        only = set(args.variants.split(",")) if args.variants else None
        if args.diagnose_only:
            doc["results"][name] = diagnose_only(name, device)
        else:
            doc["results"][name] = encoder(name, device, cuda_median_ms, diagnose=diagnose, only=only,
                                           compiled_only=args.compiled_only)
        if args.out:
            args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
