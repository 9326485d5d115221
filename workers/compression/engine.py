"""One compression run: validate, measure the baseline, prune, quantize, measure again, write the artifact."""

from __future__ import annotations

import copy
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import MODEL_NAMES, BadInput

if TYPE_CHECKING:
    from torch import nn

    from .models import Task
    from .quantize import Rounding

Emit = Callable[[str, float], None]

# The weight formats a run may be asked to choose from (quantize.parse_format's, without importing torch).
FORMAT_RE = re.compile(r"^(bf16|fp8_e4m3|int8|int4_g(?P<group>[0-9]+))$")


def parse_formats(text: str, what: str) -> tuple[str, ...]:
    """'fp8_e4m3,int4_g64' -> ('fp8_e4m3', 'int4_g64'); anything else is BadInput naming the entry."""
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names:
        raise BadInput(f"{what} needs at least one format (bf16, fp8_e4m3, int8, int4_gN)")
    for name in names:
        match = FORMAT_RE.match(name)
        if match is None or (match["group"] is not None and int(match["group"]) <= 0):
            raise BadInput(f"{what}: unknown weight format {name!r}; use bf16, fp8_e4m3, int8 or int4_gN (N > 0)")
    return names


@dataclass
class Options:
    model: str | None = None
    quantize: str = "auto"
    keep_ratio: float = 0.7
    drop_blocks: int = 0
    max_quality_drop: float | None = None
    out: Path | None = None
    upload: Path | None = None
    arch: str | None = None
    device: str = "cpu"
    group_size: int = 64
    rounding: str = "gptq"  # how int4 Linear weights are rounded: gptq (from calibration data) or rtn
    prune_steps: int = 3
    recovery_steps: int = 300
    smoke: bool = False
    latency_repeats: int = 7
    # Formats the sensitivity sweep and the assignment may use (None: bf16, fp8_e4m3, int8, int4_g<group>),
    # and, if given, the ones Linear layers may use instead: `linear_formats=("fp8_e4m3",)` keeps every
    # Linear on the FP8 tensor-core path (fp8_linear.py) while embeddings may still go to int4.
    formats: tuple[str, ...] | None = None
    linear_formats: tuple[str, ...] | None = None
    # How fp8_e4m3 Linear layers quantize their inputs when executed: "dynamic" (fp8_linear.Fp8Linear: a
    # scale per token, measured on every call) or "static" (fast_encoder: one scale per layer, calibrated
    # once and stored in the artifact; Q/K/V fused; the fp8 weights get one scale per tensor). BERTs only.
    fp8_inputs: str = "dynamic"


STATIC_FP8_ARCHES = ("minilm-l6", "bert-base")


def validate(opts: Options) -> None:
    """Everything that can be refused without loading weights is refused here, before any work or file.

    It imports no torch, so a runner learns about a typo in a second, not after the ML stack loads.
    """
    if opts.upload is None and opts.model not in MODEL_NAMES:
        raise BadInput(f"unknown model {opts.model!r}; the catalog has {', '.join(MODEL_NAMES)}")
    if not (0.0 < opts.keep_ratio <= 1.0):
        raise BadInput(f"--keep-ratio must be in (0, 1], got {opts.keep_ratio}")
    if opts.drop_blocks < 0:
        raise BadInput(f"--drop-blocks must be >= 0, got {opts.drop_blocks}")
    if opts.drop_blocks and (opts.arch if opts.upload is not None else opts.model) != "resnet50":
        raise BadInput("--drop-blocks removes residual blocks with an identity shortcut: only resnet50 has them")
    if opts.quantize not in ("auto", "preset", "off"):
        raise BadInput(f"--quantize must be auto, preset or off, got {opts.quantize!r}")
    if opts.max_quality_drop is not None and opts.max_quality_drop < 0:
        raise BadInput(f"--max-quality-drop must be >= 0, got {opts.max_quality_drop}")
    if opts.rounding not in ("gptq", "rtn"):
        raise BadInput(f"--rounding must be gptq or rtn, got {opts.rounding!r}")
    if opts.group_size <= 0:
        raise BadInput(f"--group-size must be positive, got {opts.group_size}")
    for what, formats in (("--formats", opts.formats), ("--linear-formats", opts.linear_formats)):
        if formats is not None:
            parse_formats(",".join(formats), what)
            if opts.quantize != "auto":
                raise BadInput(f"{what} is for --quantize auto (the assignment); --quantize {opts.quantize} ignores it")
    if opts.fp8_inputs not in ("dynamic", "static"):
        raise BadInput(f"--fp8-inputs must be dynamic or static, got {opts.fp8_inputs!r}")
    if opts.fp8_inputs == "static":
        arch = opts.arch if opts.upload is not None else opts.model
        if arch not in STATIC_FP8_ARCHES:
            raise BadInput(f"--fp8-inputs static runs BERT encoders only ({', '.join(STATIC_FP8_ARCHES)}), "
                           f"not {arch!r}")
        if opts.quantize == "off":
            raise BadInput("--fp8-inputs static needs quantization (--quantize auto or preset), not --quantize off")
    if opts.upload is not None:
        if opts.arch not in MODEL_NAMES:
            raise BadInput(f"--upload needs --arch, one of {', '.join(MODEL_NAMES)}; got {opts.arch!r}")
        if opts.upload.suffix != ".safetensors":
            raise BadInput(f"uploads must be .safetensors files, got {opts.upload.name!r}")
        if not opts.upload.is_file():
            raise BadInput(f"upload {str(opts.upload)!r} does not exist")
        with opts.upload.open("rb") as f:
            head = f.read(8)
        # A safetensors file starts with the little-endian length of its JSON header; a pickle or zip does not.
        if len(head) < 8 or not (2 <= int.from_bytes(head, "little") <= 100_000_000):
            raise BadInput(f"upload {opts.upload.name!r} is not a safetensors file")
    if opts.out is not None:
        if opts.out.exists() and (not opts.out.is_dir() or any(opts.out.iterdir())):
            raise BadInput(f"--out {str(opts.out)!r} exists and is not an empty folder")
        if not opts.out.parent.is_dir():
            raise BadInput(f"--out parent folder {str(opts.out.parent)!r} does not exist")


def load_upload(opts: Options) -> nn.Module:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .models import build_architecture

    model = build_architecture(opts.arch, smoke=opts.smoke)
    try:
        state = load_file(str(opts.upload))
    except (SafetensorError, OSError, ValueError) as exc:
        raise BadInput(f"upload {opts.upload.name!r} is not a readable safetensors file: {exc}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[1:3]) or first[0]
        raise BadInput(f"upload weights do not match architecture {opts.arch!r}: {detail[:300]}") from None
    return model.eval()


def measure(
    task: Task, model: nn.Module, assignment: dict[str, str] | None, rounding: Rounding | None = None
) -> tuple[dict, nn.Module]:
    """Quality, size, parameters and MACs; latency is measured later, paired with the other model."""
    from . import report
    from .quantize import RTN, apply_simulated

    if assignment is None:
        quality_model = model
    else:
        quality_model = apply_simulated(copy.deepcopy(model), assignment, rounding or RTN)
    return {
        "quality": task.quality(quality_model),
        "weight_bytes": report.weight_bytes(model, assignment),
        "params": report.params(model),
        "macs": report.macs(model, task.example_inputs),
        **task.extra_quality(quality_model),
    }, quality_model


def run(opts: Options, emit: Emit | None = None) -> dict:
    import torch

    from . import artifact, report, sensitivity
    from .gptq import collect_hessians
    from .models import make_task, to_device
    from .prune import kept_fractions, prune
    from .quantize import FULL, RTN, Rounding, apply_torchao, candidate_formats, quantizable_layers

    start, cpu_start = time.perf_counter(), time.process_time()
    validate(opts)
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device cuda asked for, but no CUDA device is visible")
    if opts.fp8_inputs == "static" and opts.device == "cuda":
        from .fp8_linear import kernel_available

        if not kernel_available("cuda"):
            raise BadInput("--fp8-inputs static needs a GPU with FP8 tensor cores (compute capability 8.9+, "
                           "e.g. L40S, H100, H200) or --device cpu")
    say = emit or (lambda stage, pct: None)
    say("load", 0.0)
    device = torch.device(opts.device)
    if opts.upload is not None:
        task = make_task(opts.arch, model=load_upload(opts), smoke=opts.smoke)
        name = f"upload:{opts.upload.name}"
    else:
        task = make_task(opts.model, smoke=opts.smoke)
        name = opts.model
    model = task.model.to(device).eval()
    task.set_reference(model)
    max_drop = task.default_max_drop if opts.max_quality_drop is None else opts.max_quality_drop
    say("baseline", 0.0)
    baseline, _ = measure(task, model, None)

    pruned, kept, pruning = model, {}, None
    if opts.keep_ratio < 1.0 or opts.drop_blocks:
        pruned, pruning = prune(
            task,
            model,
            opts.keep_ratio,
            steps=opts.prune_steps,
            recovery_steps=opts.recovery_steps,
            progress=lambda s, f: say(s, f),
            drop=opts.drop_blocks,
        )
        kept = kept_fractions(model, pruned)

    sens, quant_info = None, None
    static_fp8 = opts.fp8_inputs == "static"
    rounding, qtask = (Rounding(fp8_one_scale=True) if static_fp8 else RTN), task
    if opts.quantize != "off" and opts.rounding == "gptq":
        # Each Linear's input Gram matrix, for GPTQ's int4 rounding, on inputs that the sensitivities
        # are then not measured on (qtask's calibration set).
        say("calibrate", 0.0)
        fit, qtask = task.gptq_split()
        if fit:
            hessians = collect_hessians(
                quantizable_layers(pruned), lambda: [pruned(*to_device(inputs, device)) for inputs in fit]
            )
            rounding = Rounding(hessians, fp8_one_scale=static_fp8)
    if opts.quantize == "auto":
        formats = list(opts.formats) if opts.formats else candidate_formats(opts.group_size)
        linear_formats = list(opts.linear_formats) if opts.linear_formats else None
        sens = sensitivity.measure(qtask, pruned, formats, progress=lambda f: say("sensitivity", f), rounding=rounding,
                                   linear_formats=linear_formats)
        spent = qtask.calib_score(model) - qtask.calib_score(pruned)
        budget = max(max_drop - max(spent, 0.0), 0.0)
        say("assign", 0.0)
        assignment, quant_info = sensitivity.auto_assign(
            qtask, pruned, sens, budget, margin=task.calib_margin, rounding=rounding
        )
        quant_info["calib_drop_from_pruning"] = spent
        quant_info["formats"] = formats
        if linear_formats:
            quant_info["linear_formats"] = linear_formats
    elif opts.quantize == "preset":
        assignment = sensitivity.preset(pruned, opts.group_size)
        quant_info = {"method": "fixed preset: attention Q/K/V fp8, other Linear/Conv int4, embeddings and norms fp32"}
    else:
        assignment = {}
    assignment = {k: v for k, v in assignment.items() if v != FULL}
    if quant_info is not None:
        quant_info["rounding"] = (
            "gptq: int4 Linear weights rounded by GPTQ, fitted on inputs apart from the calibration set the "
            "sensitivities were measured on; other weights rounded to nearest"
            if rounding.hessians
            else "rtn: every weight rounded to nearest"
        )

    say("evaluate", 0.0)
    executed, simulated_layers, fp8_static = None, list(assignment), None
    compressed, simulated_model = measure(task, pruned, assignment, rounding)
    if static_fp8 and assignment:
        from .fast_encoder import choose_fp8_groups, executed_encoder

        # From the packed weights (what the artifact stores), input scales calibrated on the same inputs
        # the sensitivities were measured on.
        calib = [to_device(b, device) for b in qtask.calib_batches]
        try:
            executed, fp8_static = executed_encoder(simulated_model, assignment, calib)
        except ValueError as exc:  # the assignment put no Linear group in fp8: run it the usual way, below
            quant_info["fp8_inputs"] = {"mode": "dynamic", "why": str(exc)}
        else:
            quant_info["fp8_inputs"] = {}
            if device.type == "cuda":
                # Which fp8 Linears run FP8 is chosen by their latency on this GPU (the others run their
                # unpacked weights in bf16): at MiniLM's width, attention's projections are faster in bf16.
                scales = fp8_static["input_scales"]
                only, choice = choose_fp8_groups(simulated_model, assignment, scales, task.example_inputs)
                executed, fp8_static = executed_encoder(simulated_model, assignment, None, input_scales=scales,
                                                        only=only)
                fp8_static["fp8_groups"] = only
                quant_info["fp8_inputs"]["choice_by_latency"] = choice
            simulated_layers = fp8_static["simulated_layers"]
            quant_info["fp8_inputs"].update({k: v for k, v in fp8_static.items() if k != "simulated_layers"})
    if assignment and fp8_static is None:
        executed, simulated_layers = apply_torchao(copy.deepcopy(pruned), assignment, device.type, rounding,
                                                   use_torchao=device.type == "cuda")
        if len(simulated_layers) == len(assignment):
            executed = None  # no kernel took any layer: the executed model is the simulated one
    if executed is not None:
        # `quality` is the packed weights' (what the artifact reproduces); the model the kernels execute
        # (and whose latency is reported) is measured too: the two can differ (the kernels compute in bf16,
        # FP8 Linear layers also round their inputs to e4m3; see fp8_linear.py).
        compressed["executed_quality"] = task.quality(executed)
    elif assignment:
        compressed["executed_quality"] = compressed["quality"]  # every layer simulated: that model is what runs
    say("latency", 0.0)
    baseline["latency_ms"], compressed["latency_ms"] = report.paired_latency_ms(
        [model, executed or simulated_model], task.example_inputs, repeats=opts.latency_repeats
    )

    result = {
        "model": name,
        "arch": task.arch,
        "device": str(device),
        "quality_metric": task.quality_metric,
        "sensitivity_metric": task.sensitivity_metric,
        "data_source": task.data_source,
        "real_weights": task.real_weights,
        "max_quality_drop": max_drop,
        "baseline": baseline,
        "compressed": compressed,
        "layers": report.layer_rows(pruned, assignment, sens, kept),
        "simulated": bool(simulated_layers),
        "execution": ("fast encoder (fast_encoder.py): Q/K/V fused; fp8_e4m3 Linear layers on tensor-wise FP8 "
                      "GEMMs with static input scales; an int4 word table dequantized at lookup; "
                      if fp8_static is not None
                      else "kernels where they exist (fp8_e4m3 Linear: FP8 W8A8 on sm89+; int4 Linear: tinygemm at "
                      "the packed grid; int8: torchao); " if device.type == "cuda"
                      else "int4 Linear layers on PyTorch's CPU int4 kernel where it takes the shape; ")
        + (
            f"{len(simulated_layers)} layer(s) simulated: weights unpacked to the compute dtype, "
            "quality exactly that of the packed weights, sizes those of the packed tensors"
            if simulated_layers
            else "no simulated layers"
        ),
        "quantization": quant_info,
        "pruning": pruning,
        "notes": task.notes,
        "threads": torch.get_num_threads(),
    }
    if opts.out is not None:
        say("artifact", 0.0)
        reference = None
        if task.reference_eval is not None:
            reference = {f"eval.{i}": t.contiguous() for i, t in enumerate(task.reference_eval)}
        manifest = {
            "model": name,
            "arch": task.arch,
            "smoke": opts.smoke,
            "assignment": assignment,
            "reported_quality": compressed["quality"],
            "quality_metric": task.quality_metric,
        }
        if fp8_static is not None:
            manifest["fp8_inputs"] = {"mode": "static", "margin": fp8_static["margin"],
                                      "input_scales": fp8_static["input_scales"],
                                      "executed_quality": compressed.get("executed_quality")}
            if "fp8_groups" in fp8_static:
                manifest["fp8_inputs"]["fp8_groups"] = fp8_static["fp8_groups"]
        artifact.save(opts.out, copy.deepcopy(pruned).cpu(), assignment, manifest, reference, rounding)
        result["artifact"] = str(opts.out)
    result["wall_s"] = time.perf_counter() - start
    # CPU seconds of this process: on a shared machine, wall time also counts other processes' load.
    result["cpu_s"] = time.process_time() - cpu_start
    say("done", 1.0)
    return result
