"""Compression benchmark; prints JSON (and writes it with --out).

CPU (this machine): digits-cnn quantized / pruned / both against the issue's goals, and minilm-l6
end to end (sensitivity, assignment, quantization, evaluation) with its wall time.
GPU (--device cuda): minilm-l6 and bert-base side by side — fp32, bf16, bf16 + torch.compile
(reduce-overhead: CUDA graphs), torchao's uniform int8 / float8 (dynamic, compiled) and int4
(weight-only, eager), the sensitivity-chosen mix, and fast_encoder's forms (bf16 with Q/K/V fused, a
second bf16 bar; FP8 Linears with static input scales, every Linear or the MLP's, int4 word table)
— at batch 1, 8 and 64 x 128 tokens; then, if
time is left, ResNet-50 pruned and Llama-1B one-token decode. Every section checks a deadline and
the JSON is rewritten after each measurement, so a run cut short still reports what it measured.

    python bench/compression.py --device cpu --out bench/results/compression-DATE-cpu.json
    python bench/compression.py --device cuda --deadline-s 540 --out $OUT/compression-h200.json
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from gpu_timing import cuda_median_ms, graph_replay_ms  # noqa: E402

from workers.compression import engine, report, sensitivity  # noqa: E402
from workers.compression.gptq import collect_hessians  # noqa: E402
from workers.compression.models import make_task, to_device  # noqa: E402
from workers.compression.quantize import (  # noqa: E402
    FULL,
    RTN,
    Rounding,
    apply_simulated,
    apply_torchao,
    quantizable_layers,
)

START = time.perf_counter()
# The GPU sections run on DEV; `--dry-run` points them at the CPU, eager only, to check the code paths.
DEV = "cuda"
COMPILE = True
# KEEP:DROP pairs for the ResNet-50 section: channels kept, whole residual blocks dropped.
RESNET_VARIANTS = os.environ.get("RESNET_VARIANTS", "0.5:0,0.6:10,0.7:10")
# Llama decode: how DecodeLlama is compiled, and the quality budgets whose sensitivity mixes are timed.
LLAMA_COMPILE_MODE = os.environ.get("LLAMA_COMPILE_MODE", "reduce-overhead")
ROUNDING = os.environ.get("ROUNDING", "gptq")  # encoders' sensitivity mix: gptq (the engine's default) or rtn
LLAMA_TUNE = os.environ.get("LLAMA_TUNE", "1") == "1"
LLAMA_BUDGETS = [float(b) for b in os.environ.get("LLAMA_BUDGETS", "0.01,0.2").split(",")]
# torch: inductor-fused torch expressions (cuBLAS for bf16); tinygemm: PyTorch's int4 kernel;
# triton: workers/compression/triton_decode.py; triton-a8: the same, its int4 products rounding their input
# to int8 per block of 32 (W4A8, dp4a). The best bf16 of all is the baseline of the goal.
LLAMA_BACKENDS = os.environ.get("LLAMA_BACKENDS", "torch,triton,tinygemm").split(",")
# Also time each step as one hand-captured CUDA graph (triton: eager, with PDL on Hopper); the goal takes
# the faster replay of each variant, for bf16 and the mixes alike.
LLAMA_ONE_GRAPH = os.environ.get("LLAMA_ONE_GRAPH", "1") == "1"
BATCHES = (1, 8, 64)


class Bench:
    def __init__(self, out: Path | None, deadline_s: float):
        self.out = out
        self.deadline = START + deadline_s
        self.section_deadline = self.deadline
        self.doc: dict = {
            "benchmark": "compression",
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"),
            "host": platform.node(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu_threads": torch.get_num_threads(),
            "results": {},
            "goals": [],
            "skipped": [],
            "errors": [],
        }
        if torch.cuda.is_available():
            self.doc["gpu"] = torch.cuda.get_device_name()
        try:
            import torchao

            self.doc["torchao"] = torchao.__version__
        except Exception as exc:  # noqa: BLE001 - the report says why torchao is missing
            self.doc["torchao"] = f"unavailable: {exc}"

    def left(self) -> float:
        return min(self.deadline, self.section_deadline) - time.perf_counter()

    def section(self, until_s: float) -> None:
        """Give the next section time up to `until_s` after start (the global deadline still holds)."""
        self.section_deadline = START + until_s

    def save(self) -> None:
        self.doc["elapsed_s"] = round(time.perf_counter() - START, 1)
        text = json.dumps(self.doc, indent=1, default=str)
        if self.out:
            tmp = self.out.with_suffix(".tmp")
            tmp.write_text(text)
            os.replace(tmp, self.out)

    def goal(self, name: str, target: str, measured, met: bool | None) -> None:
        self.doc["goals"].append({"goal": name, "target": target, "measured": measured, "met": met})
        self.save()

    def guard(self, label: str, need_s: float, fn, *args):
        if self.left() < need_s:
            self.doc["skipped"].append(f"{label}: {self.left():.0f} s left, needs about {need_s:.0f} s")
            self.save()
            return None
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - one failed variant must not lose the others
            self.doc["errors"].append(
                {"where": label, "error": f"{type(exc).__name__}: {exc}"[:600], "trace": traceback.format_exc()[-1500:]}
            )
            self.save()
            return None


# ------------------------------------------------------------------ CPU


def cpu(bench: Bench, models: list[str]) -> None:
    res = bench.doc["results"]
    if "digits-cnn" in models:
        runs = {
            "quantized": engine.Options(model="digits-cnn", quantize="auto", keep_ratio=1.0, max_quality_drop=0.3),
            "pruned": engine.Options(model="digits-cnn", quantize="off", keep_ratio=0.7),
            "pruned+quantized": engine.Options(
                model="digits-cnn", quantize="auto", keep_ratio=0.7, max_quality_drop=1.1
            ),
        }
        for label, opts in runs.items():
            r = bench.guard(f"digits-cnn {label}", 60, engine.run, opts)
            if r is None:
                continue
            res[f"digits-cnn {label}"] = r
            b, c = r["baseline"], r["compressed"]
            drop = b["quality"] - c["quality"]
            size = b["weight_bytes"] / c["weight_bytes"]
            fewer = b["params"] / c["params"]
            if label == "quantized":
                bench.goal(
                    "digits-cnn quantized",
                    ">= 4x smaller weights, drop <= 0.3 points",
                    {"weights_x": size, "drop_points": drop},
                    size >= 4 and drop <= 0.3,
                )
            elif label == "pruned":
                bench.goal(
                    "digits-cnn pruned keep 0.7 + recovery",
                    ">= 2x fewer params, drop <= 1.1 points",
                    {"params_x": fewer, "drop_points": drop},
                    fewer >= 2 and drop <= 1.1,
                )
            else:
                bench.goal(
                    "digits-cnn pruned + quantized",
                    ">= 8x smaller, drop <= 1.1 points",
                    {"weights_x": size, "drop_points": drop},
                    size >= 8 and drop <= 1.1,
                )
    if "minilm-l6" in models:
        r = bench.guard(
            "minilm-l6 auto", 200, engine.run, engine.Options(model="minilm-l6", quantize="auto", keep_ratio=1.0)
        )
        if r is not None:
            res["minilm-l6 auto"] = r
            b, c = r["baseline"], r["compressed"]
            bench.goal(
                "minilm-l6 end to end on this CPU",
                "<= 300 s (model load, sensitivity, assignment, quantize, evaluate)",
                {
                    "wall_s": r["wall_s"],
                    "cpu_s": r["cpu_s"],
                    "load_avg_1m_at_end": os.getloadavg()[0],
                    "weights_x": b["weight_bytes"] / c["weight_bytes"],
                    "fidelity": c["quality"],
                    "nn_agreement": c.get("nn_agreement"),
                },
                r["wall_s"] <= 300,
            )
        # GPTQ (the default) against round-to-nearest: the same auto budget, and the fixed preset
        # (same formats, so the same size: only the rounding differs).
        for label, opts in {
            "minilm-l6 auto, rtn": engine.Options(model="minilm-l6", quantize="auto", keep_ratio=1.0, rounding="rtn"),
            "minilm-l6 preset, gptq": engine.Options(model="minilm-l6", quantize="preset", keep_ratio=1.0),
            "minilm-l6 preset, rtn": engine.Options(
                model="minilm-l6", quantize="preset", keep_ratio=1.0, rounding="rtn"
            ),
        }.items():
            r = bench.guard(label, 120, engine.run, opts)
            if r is not None:
                res[label] = r
        rows = {k: res[k] for k in ("minilm-l6 auto", "minilm-l6 auto, rtn", "minilm-l6 preset, gptq",
                                    "minilm-l6 preset, rtn") if k in res}
        res["minilm-l6 rounding comparison"] = {
            k: {
                "weights_x": r["baseline"]["weight_bytes"] / r["compressed"]["weight_bytes"],
                "fidelity": r["compressed"]["quality"],
                "nn_agreement": r["compressed"].get("nn_agreement"),
                "formats": {f: sum(1 for row in r["layers"] if row["format"] == f) for f in
                            sorted({row["format"] for row in r["layers"]})},
                "wall_s": r["wall_s"],
            }
            for k, r in rows.items()
        }
        bench.save()


# ------------------------------------------------------------------ GPU


def cuda_time_ms(fn, warmup: int = 5, repeats: int = 30) -> float:
    if DEV != "cuda":
        return statistics.median([_wall_ms(fn) for _ in range(2)])
    return cuda_median_ms(fn, warmup, repeats)


def _wall_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def encoder_inputs(task, name: str, batch: int) -> tuple:
    if name == "minilm-l6":
        ids, mask = task.example_inputs  # 8 real sentences padded to 128
        reps = -(-batch // ids.shape[0])
        return ids.repeat(reps, 1)[:batch].to(DEV), mask.repeat(reps, 1)[:batch].to(DEV)
    gen = torch.Generator().manual_seed(batch)
    return (
        torch.randint(1000, 30522, (batch, 128), generator=gen).to(DEV),
        torch.ones(batch, 128, dtype=torch.long).to(DEV),
    )


def fidelity(task, model, name) -> float:
    batches = task.eval_batches if name == "minilm-l6" else [encoder_inputs(task, name, 64)]
    with torch.inference_mode():
        outs = [model(*to_device(b, DEV)).float() for b in batches]
    ref = task.reference_eval if name == "minilm-l6" else task.gpu_reference
    sims = [
        torch.nn.functional.cosine_similarity(o.reshape(-1, o.shape[-1]), r.to(DEV).reshape(-1, r.shape[-1]), dim=1)
        for o, r in zip(outs, ref, strict=True)
    ]
    return torch.cat(sims).mean().item()


def encoders(bench: Bench, name: str) -> None:
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        quantize_,
    )

    torch._dynamo.reset()
    t0 = time.perf_counter()
    task = make_task(name)
    fp32 = task.model.to(DEV).eval()
    task.set_reference(fp32)
    if name != "minilm-l6":
        with torch.inference_mode():
            task.gpu_reference = [fp32(*encoder_inputs(task, name, 64)).float().cpu()]
    out = bench.doc["results"].setdefault(
        f"{name} h200", {"real_weights": task.real_weights, "quality_metric": task.quality_metric, "variants": {}}
    )
    # Sensitivity and assignment on the GPU (fp32 fake-quant of one layer at a time), budget 0.01 cosine,
    # with the engine's default rounding (GPTQ for int4 Linear weights unless ROUNDING=rtn).
    rounding, qtask = RTN, task
    if ROUNDING == "gptq":
        fit, qtask = task.gptq_split()
        rounding = Rounding(
            collect_hessians(quantizable_layers(fp32), lambda: [fp32(*to_device(b, DEV)) for b in fit])
        )
    if DEV == "cuda":
        sens = sensitivity.measure(qtask, fp32, sensitivity.default_formats(128), rounding=rounding)
        assignment, info = sensitivity.auto_assign(qtask, fp32, sens, 0.01, rounding=rounding)
    else:  # the dry run checks code paths, not the (slow on CPU) sweep
        assignment, info = sensitivity.preset(fp32, 128), {"method": "preset (dry run)"}
    info["rounding"] = rounding.name
    assignment = {k: v for k, v in assignment.items() if v != FULL}
    out["sensitivity_s"] = round(time.perf_counter() - t0, 1)
    out["assignment_info"] = info
    out["assignment_formats"] = {f: sum(1 for v in assignment.values() if v == f) for f in set(assignment.values())}
    bench.save()
    fp32_bytes = report.weight_bytes(fp32)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)

    def uniform(cfg):
        def build():
            m = copy.deepcopy(bf16)
            quantize_(m, cfg, filter_fn=lambda mod, fqn: isinstance(mod, torch.nn.Linear))
            return m

        return build

    def mix_kernels():
        m = copy.deepcopy(fp32).to(torch.bfloat16)  # layers the mix keeps in fp32 run in bf16 here
        m, simulated = apply_torchao(m, assignment, DEV, rounding)
        out["mix_simulated_layers"] = simulated
        return m

    def mix_dequant():
        return apply_simulated(copy.deepcopy(fp32), assignment, rounding).to(torch.bfloat16)

    # fast_encoder's forms (docs/compression.md, "FP8 with static input scales"): the fused-QKV encoder in
    # bf16 (a second bf16 bar), and FP8 Linears with input scales calibrated once on the calibration
    # inputs, every Linear or the MLP's only, with the word table in int4_g64.
    from workers.compression.fast_encoder import Encoder, encoder_sources, fp8_static_encoder, stored_formats

    calib = [to_device(b, DEV) for b in task.calib_batches]
    every_group = [g for g in encoder_sources(fp32) if g.startswith("layers.")]
    mlp_groups = [g for g in every_group if g.endswith((".fc1", ".fc2"))]

    def static_fp8(only):
        return lambda: fp8_static_encoder(fp32, calib, fp8_layers=only, word_format="int4_g64")

    linear_only = {n: f for n, f in ((n, "int8") for n, m in fp32.named_modules() if isinstance(m, torch.nn.Linear))}
    sizes = {
        "fp32": fp32_bytes,
        "bf16": fp32_bytes // 2,
        "int8-dynamic": report.weight_bytes(fp32, linear_only),
        "float8-dynamic": report.weight_bytes(fp32, linear_only),
        "int4-weight-only": report.weight_bytes(fp32, {n: "int4_g128" for n in linear_only}),
        "mix": report.weight_bytes(fp32, assignment),
        "mix-dequant-on-load": report.weight_bytes(fp32, assignment),
        "bf16-fused-qkv": fp32_bytes // 2,
        "fp8-static": report.weight_bytes(fp32, stored_formats(fp32, every_group)),
        "fp8-static-mlp": report.weight_bytes(fp32, stored_formats(fp32, mlp_groups)),
    }
    # Most telling first: a deadline cuts the tail. torch.compile runs as reduce-overhead (inductor + CUDA graphs).
    ro = "reduce-overhead"
    variants = [
        ("bf16", lambda: bf16, [None, ro]),
        ("bf16-fused-qkv", lambda: Encoder(fp32).to(torch.bfloat16).eval(), [ro]),
        ("fp8-static", static_fp8(None), [ro]),
        ("fp8-static-mlp", static_fp8(mlp_groups), [ro]),
        ("mix", mix_kernels, [None, ro]),
        (
            "int4-weight-only",
            uniform(Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d")),
            [None],
        ),
        ("int8-dynamic", uniform(Int8DynamicActivationInt8WeightConfig()), [ro]),
        ("float8-dynamic", uniform(Float8DynamicActivationFloat8WeightConfig()), [ro]),
        ("mix-dequant-on-load", mix_dequant, [None]),
        ("fp32", lambda: fp32, [None]),
    ]
    for label, build, modes in variants:
        model = bench.guard(f"{name} {label} build", 15, build)
        if model is None:
            continue
        entry = out["variants"].setdefault(label, {"weight_bytes": sizes[label], "latency_ms": {}})
        entry["fidelity"] = bench.guard(f"{name} {label} fidelity", 5, fidelity, task, model, name)
        if label == "mix-dequant-on-load":
            entry["note"] = (
                "artifact holds the packed mix; weights are unpacked to bf16 at load, so the GPU runs "
                "exactly bf16's kernels and holds bf16-sized weights"
            )
        for mode in modes:
            if mode is not None and not COMPILE:
                continue
            if mode is not None:
                # Variants share code objects (HF BertModel.forward, Encoder.forward); three batch sizes
                # each would pass dynamo's recompile limit (8) by the third variant, which then runs eager.
                torch._dynamo.reset()
            runner = model if mode is None else torch.compile(model, mode=mode, dynamic=False)
            key = "eager" if mode is None else f"compile-{mode}"
            for batch in BATCHES:
                inputs = encoder_inputs(task, name, batch)

                def step(r=runner, i=inputs):
                    with torch.inference_mode():
                        r(*i)

                ms = bench.guard(f"{name} {label} {key} b{batch}", 45 if mode else 5, cuda_time_ms, step)
                entry["latency_ms"].setdefault(key, {})[f"b{batch}x128"] = ms
                bench.save()
        del model
        if DEV == "cuda":
            torch.cuda.empty_cache()
    v = out["variants"]

    def best(label):
        lat = v.get(label, {}).get("latency_ms", {})
        return {
            b: min((m[b] for m in lat.values() if m.get(b) is not None), default=None)
            for b in ("b1x128", "b8x128", "b64x128")
        }

    bf16_best = {b: min((x for x in (best("bf16")[b], best("bf16-fused-qkv")[b]) if x is not None), default=None)
                 for b in best("bf16")}
    mix_best = best("mix")
    mix_fid = v.get("mix", {}).get("fidelity")
    size_x = fp32_bytes / sizes["mix"]
    bench.goal(
        f"{name} mix on H200: weights and fidelity",
        ">= 4x smaller than fp32, fidelity >= 0.99",
        {"weights_x": size_x, "fidelity": mix_fid},
        bool(mix_fid and size_x >= 4 and mix_fid >= 0.99),
    )
    ok = all(mix_best[b] is not None and bf16_best[b] is not None and mix_best[b] <= bf16_best[b] for b in bf16_best)
    bench.goal(
        f"{name} mix on H200: latency",
        "no worse than the best bf16 at batch 1, 8, 64 x 128",
        {"mix_best_ms": mix_best, "bf16_best_ms": bf16_best},
        ok,
    )
    for label in ("fp8-static", "fp8-static-mlp"):
        if label not in v:
            continue
        ours, fid, x = best(label), v[label].get("fidelity"), fp32_bytes / sizes[label]
        bench.goal(
            f"{name} {label} on H200: size, fidelity, latency",
            ">= 4x smaller than fp32, fidelity >= 0.99, no worse than the best bf16 (of bf16, bf16-fused-qkv) "
            "at batch 1, 8, 64 x 128",
            {"weights_x": x, "fidelity": fid, "best_ms": ours, "bf16_best_ms": bf16_best},
            bool(fid and x >= 4 and fid >= 0.99 and all(
                ours[b] is not None and bf16_best[b] is not None and ours[b] <= bf16_best[b] for b in bf16_best)),
        )


def resnet(bench: Bench) -> None:
    """Pruned ResNet-50 against the unpruned one, each timed under two settings: as it is, and with its stem
    rewritten as space-to-depth (workers/compression/reparam.py, exact). The goal is judged for each setting
    applied to both models, and best against best."""
    from workers.compression.prune import prune
    from workers.compression.reparam import space_to_depth_stem

    torch._dynamo.reset()
    task = make_task("resnet50")
    base = task.model.to(DEV).eval()
    out = bench.doc["results"].setdefault("resnet50 h200", {"real_weights": False, "variants": {}})
    out["settings"] = {
        "plain": "b64 bf16 channels_last, torch.compile reduce-overhead",
        "s2d": "the same, stem rewritten as pixel_unshuffle + 4x4 conv over 16 channels (exact)",
    }
    x = torch.randn(64 if DEV == "cuda" else 2, 3, 224, 224, device=DEV, dtype=torch.bfloat16).to(
        memory_format=torch.channels_last
    )
    task.example_inputs = (torch.randn(2, 3, 224, 224),)
    variants = [("unpruned", 1.0, 0)]
    for item in RESNET_VARIANTS.split(","):
        keep, _, drop = item.partition(":")
        label = f"taylor keep {float(keep)}" + (f" + {int(drop)} blocks dropped" if drop and int(drop) else "")
        variants.append((label, float(keep), int(drop or 0)))
    for label, keep, drop in variants:
        info = None
        if keep < 1 or drop:
            pruned = bench.guard(
                f"resnet50 prune {label}",
                90,
                lambda k=keep, d=drop: prune(
                    task, base, k, steps=1, taylor_batches=2, recovery_steps=0, round_to=8, drop=d
                ),
            )
            if pruned is None:
                continue
            model, info = pruned
        else:
            model = base
        row = {"params": report.params(model)}
        if info and info.get("dropped_blocks"):
            row["dropped_blocks"] = info["dropped_blocks"]
        for setting in ("plain", "s2d"):
            m = copy.deepcopy(model)
            if setting == "s2d":
                space_to_depth_stem(m, 8)
            m = m.to(torch.bfloat16).to(memory_format=torch.channels_last)
            torch._dynamo.reset()
            compiled = torch.compile(m, mode="reduce-overhead", dynamic=False) if COMPILE else m

            def step(c=compiled):
                with torch.inference_mode():
                    c(x)

            row[f"latency_ms_{setting}"] = bench.guard(f"resnet50 {label} {setting} latency", 60, cuda_time_ms, step)
        out["variants"][label] = row
        bench.save()
    v = out["variants"]
    ref = v.get("unpruned")
    if not ref:
        return
    for label, row in v.items():
        if label == "unpruned":
            continue
        px = ref["params"] / row["params"]
        ratios = {
            s: ref[f"latency_ms_{s}"] / row[f"latency_ms_{s}"]
            for s in ("plain", "s2d")
            if ref.get(f"latency_ms_{s}") and row.get(f"latency_ms_{s}")
        }
        best = [row.get(f"latency_ms_{s}") for s in ("plain", "s2d") if row.get(f"latency_ms_{s}")]
        best_ref = [ref.get(f"latency_ms_{s}") for s in ("plain", "s2d") if ref.get(f"latency_ms_{s}")]
        if best and best_ref:
            ratios["best_vs_best"] = min(best_ref) / min(best)
        for setting, lx in ratios.items():
            bench.goal(
                f"resnet50 {label} ({setting})",
                ">= 3.2x fewer params and >= 2.5x lower latency",
                {"params_x": px, "latency_x": lx},
                px >= 3.2 and lx >= 2.5,
            )


def llama(bench: Bench) -> None:
    """One-token decode of the 1.1 B Llama at batch 1 from packed weights (workers/compression/decode.py).

    Sensitivity is measured once (every layer x bf16 / fp8 / int8 / int4_g128, output cosine to fp32 on
    random tokens); the greedy assignment is then taken at each budget of LLAMA_BUDGETS. Each mix, bf16,
    and int4 everywhere run through the same DecodeLlama, compiled with CUDA graphs (reduce-overhead),
    timed at position 511 of a 512-token cache. Decode fidelity: cosine of the logits after decoding 32
    tokens one by one, to the fp32 model's logits on the same 32 tokens.
    """
    from workers.compression.decode import DecodeLlama
    from workers.compression.quantize import candidate_formats
    from workers.compression.reparam import fold_rmsnorm_weights

    torch._dynamo.reset()
    if DEV == "cuda":
        torch._inductor.config.coordinate_descent_tuning = LLAMA_TUNE
    task = make_task("llama-1b", smoke=DEV != "cuda")
    model = task.model.to(DEV).eval()
    # norm weights into the projections (the same function), so that the decode kernels read no norm; the
    # catalog's random Llama has norms of ones already (0 folded)
    folded = fold_rmsnorm_weights(model)
    task.set_reference(model)
    out = bench.doc["results"].setdefault(
        "llama-1b h200 decode",
        {
            "real_weights": False,
            "setup": "batch 1, one token at position 511 of a 512-token static KV cache; DecodeLlama compiled "
            f"with mode={LLAMA_COMPILE_MODE!r}, fullgraph; inductor coordinate_descent_tuning={LLAMA_TUNE}",
            "variants": {},
            "mixes": {},
        },
    )
    out["rmsnorms_folded"] = folded
    ids = torch.randint(1000, task.model.lm.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        ref_logits = model.lm(input_ids=ids.to(DEV), use_cache=False).logits[0, -1].float()

    t = time.perf_counter()
    rounding, qtask = RTN, task
    with torch.inference_mode():
        if ROUNDING == "gptq":
            fit, qtask = task.gptq_split()
            rounding = Rounding(
                collect_hessians(quantizable_layers(model), lambda m=model: [m(*to_device(b, DEV)) for b in fit])
            )
        sens = sensitivity.measure(qtask, model, candidate_formats(128), rounding=rounding)
    out["rounding"] = rounding.name
    out["sensitivity_s"] = round(time.perf_counter() - t, 1)
    out["sensitivity_formats"] = candidate_formats(128)
    bench.save()

    variants: dict[str, dict[str, str]] = {"bf16": {}}  # every variant runs on each of LLAMA_BACKENDS
    for budget in LLAMA_BUDGETS:
        t = time.perf_counter()
        with torch.inference_mode():
            assignment, info = sensitivity.auto_assign(qtask, model, sens, budget, rounding=rounding)
            quality = task.quality(apply_simulated(copy.deepcopy(model), assignment, rounding))
        assignment = {k: v for k, v in assignment.items() if v != FULL}
        counts: dict[str, int] = {}
        for fmt in assignment.values():
            counts[fmt] = counts.get(fmt, 0) + 1
        label = f"sensitivity mix, budget {budget}"
        out["mixes"][label] = {
            "budget": budget,
            "quality_cosine": quality,
            "formats": counts,
            "layers": len(quantizable_layers(model)),
            "assign_s": round(time.perf_counter() - t, 1),
            **{k: info[k] for k in ("measured_calib_drop", "moves", "moves_kept", "greedy", "extensions",
                                    "evaluations")},
        }
        bench.save()
        if assignment not in variants.values():
            variants[label] = assignment
    everything = {n: "int4_g128" for n in quantizable_layers(model)}
    with torch.inference_mode():
        out["mixes"]["int4_g128 everywhere"] = {
            "quality_cosine": task.quality(apply_simulated(copy.deepcopy(model), everything, rounding))
        }
    variants["int4_g128 everywhere (not sensitivity-chosen)"] = everything

    lm = copy.deepcopy(model.lm).to(torch.bfloat16)
    del model
    if DEV == "cuda":
        torch.cuda.empty_cache()

    def run(label: str, assignment: dict[str, str], name: str) -> float:
        torch._dynamo.reset()
        backend, a8 = name.removesuffix("-a8"), name.endswith("-a8")
        # The packs are the ones the mix was chosen with (GPTQ's from the fp32 weights, cached).
        dec = DecodeLlama(
            lm, assignment, max_len=512, dtype=torch.bfloat16, backend=backend, rounding=rounding,
            rounding_prefix="lm.", int8_inputs=a8,
        )
        row = {"weight_bytes": dec.weight_bytes(), "backend": backend, "int8_inputs": a8}
        t = time.perf_counter()
        step_fn = torch.compile(dec, mode=LLAMA_COMPILE_MODE, fullgraph=True, dynamic=False) if COMPILE else dec
        with torch.inference_mode():
            for i in range(ids.shape[1]):
                logits = step_fn(ids[0, i : i + 1].to(DEV), torch.tensor([i], device=DEV)).clone()
        row["compile_and_32_tokens_s"] = round(time.perf_counter() - t, 1)
        from torch._dynamo.utils import counters

        row["inductor_counters"] = {k: v for k, v in counters["inductor"].items() if "cudagraph" in k}
        row["decode_fidelity"] = torch.nn.functional.cosine_similarity(logits, ref_logits, dim=0).item()
        tok, pos = torch.tensor([123], device=DEV), torch.tensor([511], device=DEV)

        def step():
            with torch.inference_mode():
                step_fn(tok, pos)

        row["latency_ms_per_token"] = cuda_time_ms(step, warmup=10, repeats=100)
        if DEV == "cuda" and COMPILE and LLAMA_ONE_GRAPH:
            # The same step as one hand-captured CUDA graph (a replay costs GPU time only, not the compiled
            # module's call): triton's eager step, with programmatic dependent launch where the GPU has it;
            # the other backends' step compiled without cudagraph trees.
            torch._dynamo.reset()
            if backend == "triton":
                from workers.compression.triton_decode import pdl_supported

                pdl = pdl_supported()
                one = DecodeLlama(lm, assignment, max_len=512, dtype=torch.bfloat16, backend=backend,
                                  rounding=rounding, rounding_prefix="lm.", pdl=pdl, int8_inputs=a8)
                row["one_graph"] = "eager step" + (", programmatic dependent launch" if pdl else "")
            else:
                one = torch.compile(dec, mode="default", fullgraph=True, dynamic=False)
                row["one_graph"] = "compiled step (mode default)"
            row["one_graph_ms_per_token"] = graph_replay_ms(one, tok, pos)
            del one
        out["variants"][label] = row
        bench.save()
        return row["latency_ms_per_token"]

    for label, assignment in variants.items():
        # bf16 always runs on both of its backends: the goal's baseline is the faster of the two.
        for backend in LLAMA_BACKENDS if assignment else ["torch", "triton"]:
            if backend in ("tinygemm", "triton-a8") and not any(f.startswith("int4") for f in assignment.values()):
                continue
            if DEV != "cuda" and backend != "torch":
                continue
            bench.guard(f"llama decode {label}, {backend}", 60, run, f"{label}, {backend}", assignment, backend)

    def best_ms(row: dict) -> float:  # the faster of the two ways of replaying the step
        return min(row["latency_ms_per_token"], row.get("one_graph_ms_per_token", math.inf))

    bf16 = [r for k, r in out["variants"].items() if k.startswith("bf16,")]
    if not bf16:
        return
    base = min(bf16, key=best_ms)
    replayed = best_ms(base) < base["latency_ms_per_token"]
    out["best_bf16"] = {"backend": base["backend"], "latency_ms_per_token": best_ms(base),
                        "how": base["one_graph"] if replayed else f"compiled, mode {LLAMA_COMPILE_MODE}"}
    for label, row in out["variants"].items():
        if not label.startswith("sensitivity mix"):
            continue
        lat_x = best_ms(row) / best_ms(base)
        size_x = base["weight_bytes"] / row["weight_bytes"]
        row["latency_over_best_bf16"], row["weights_x_smaller"] = lat_x, size_x
        bench.goal(
            f"llama-1b decode: {label}",
            "<= 0.6x the latency of the best bf16 with CUDA graphs, weights >= 3.5x smaller than bf16",
            {"latency_over_best_bf16": lat_x, "weights_x_smaller": size_x},
            lat_x <= 0.6 and size_x >= 3.5,
        )


def gpu(bench: Bench, models: list[str]) -> None:
    if DEV == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    # Shares of the deadline per section, so that one slow section cannot starve the rest.
    total = bench.deadline - START
    plan = [
        ("minilm-l6", 0.38, encoders),
        ("bert-base", 0.76, encoders),
        ("resnet50", 0.88, None),
        ("llama-1b", 1.0, None),
    ]
    for name, share, fn in plan:
        if name not in models:
            continue
        bench.section(total * share)
        if name == "resnet50":
            bench.guard("resnet50 section", 30, resnet, bench)
        elif name == "llama-1b":
            bench.guard("llama-1b section", 40, llama, bench)
        else:
            bench.guard(f"{name} section", 60, fn, bench, name)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--models",
        default=None,
        help="comma-separated; default: digits-cnn,minilm-l6 on CPU, minilm-l6,bert-base,resnet50,llama-1b on CUDA",
    )
    p.add_argument("--deadline-s", type=float, default=3000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path)
    p.add_argument("--dry-run", action="store_true", help="run the GPU sections on the CPU, eager, to test them")
    args = p.parse_args()
    global DEV, COMPILE, BATCHES
    if args.dry_run:
        DEV, COMPILE, BATCHES = "cpu", False, (1,)
    torch.set_num_threads(args.threads)
    default = "digits-cnn,minilm-l6" if args.device == "cpu" else "minilm-l6,bert-base,resnet50,llama-1b"
    models = (args.models or default).split(",")
    bench = Bench(args.out, args.deadline_s)
    bench.doc["device"] = args.device
    (gpu if args.device == "cuda" or args.dry_run else cpu)(bench, models)
    bench.save()
    print(json.dumps(bench.doc, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
