"""python -m workers.compression --model M --quantize auto|preset|off --keep-ratio R [...] --json

Exit 0 with the report; exit 2 with one line on stderr for input the user must fix, writing nothing.
With --json-lines, progress objects {"type": "progress", "stage", "pct"} precede the report, which
is always the last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from . import BadInput


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints a usage block; a runner wants one line
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def parse(argv: list[str]) -> argparse.Namespace:
    p = OneLineParser(prog="python -m workers.compression", description=__doc__)
    p.add_argument("--model", help="catalog name: digits-cnn, minilm-l6, resnet50, bert-base, llama-1b")
    p.add_argument("--quantize", default="auto", help="auto (sensitivity-driven), preset or off")
    p.add_argument("--keep-ratio", type=float, default=0.7, help="share of prunable channels kept; 1 = no pruning")
    p.add_argument(
        "--drop-blocks",
        type=int,
        default=0,
        help="also remove this many whole residual blocks (resnet50), least important per MAC first",
    )
    p.add_argument(
        "--max-quality-drop",
        type=float,
        default=None,
        help="in the model's quality units (top-1 points; cosine for fidelity); default per model",
    )
    p.add_argument("--out", type=Path, help="write the artifact (safetensors + manifest) into this new folder")
    p.add_argument("--upload", type=Path, help="a .safetensors file of weights for --arch")
    p.add_argument("--arch", help="catalog architecture of --upload")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--group-size", type=int, default=64, help="int4 group size")
    p.add_argument(
        "--rounding",
        default="gptq",
        help="int4 rounding of Linear weights: gptq (fitted on calibration inputs, the default) or rtn",
    )
    p.add_argument(
        "--formats",
        help="comma list of weight formats the assignment may use (default bf16,fp8_e4m3,int8,int4_g<group-size>)",
    )
    p.add_argument(
        "--linear-formats",
        help="comma list for Linear layers only (default: --formats); fp8_e4m3 alone keeps every Linear on the "
        "FP8 tensor-core path",
    )
    p.add_argument(
        "--fp8-inputs",
        default="dynamic",
        choices=["dynamic", "static"],
        help="how fp8_e4m3 Linear layers quantize their inputs: dynamic (a scale per token, every call) or static "
        "(one calibrated scale per layer, stored in the artifact; Q/K/V fused; minilm-l6 and bert-base only)",
    )
    p.add_argument("--prune-steps", type=int, default=3)
    p.add_argument("--recovery-steps", type=int, default=300)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads; 1 by default because a shared CPU punishes oversubscription",
    )
    p.add_argument("--smoke", action="store_true", help="reduced llama config (tests)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--json-lines", action="store_true", help="also print progress JSON lines before the report")
    args = p.parse_args(argv)
    if args.model is None and args.upload is None:
        p.error("give --model NAME or --upload FILE.safetensors --arch NAME")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    from .engine import Options, parse_formats, run, validate

    try:
        formats = parse_formats(args.formats, "--formats") if args.formats is not None else None
        linear_formats = (
            parse_formats(args.linear_formats, "--linear-formats") if args.linear_formats is not None else None
        )
    except BadInput as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    opts = Options(
        model=args.model,
        quantize=args.quantize,
        keep_ratio=args.keep_ratio,
        drop_blocks=args.drop_blocks,
        max_quality_drop=args.max_quality_drop,
        out=args.out,
        upload=args.upload,
        arch=args.arch,
        device=args.device,
        group_size=args.group_size,
        rounding=args.rounding,
        prune_steps=args.prune_steps,
        recovery_steps=args.recovery_steps,
        smoke=args.smoke,
        formats=formats,
        linear_formats=linear_formats,
        fp8_inputs=args.fp8_inputs,
    )

    def emit(stage: str, pct: float) -> None:
        if args.json_lines:
            print(json.dumps({"type": "progress", "stage": stage, "pct": round(100 * pct, 1)}), flush=True)

    try:
        validate(opts)
        import torch

        torch.set_num_threads(max(args.threads, 1))
        result = run(opts, emit)
    except BadInput as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json or args.json_lines:
        print(json.dumps({"type": "result", **result} if args.json_lines else result), flush=True)
    else:
        b, c = result["baseline"], result["compressed"]
        print(
            f"{result['model']}: quality {b['quality']:.4f} -> {c['quality']:.4f}, "
            f"weights {b['weight_bytes']} -> {c['weight_bytes']} bytes "
            f"({b['weight_bytes'] / max(c['weight_bytes'], 1):.2f}x), params {b['params']} -> {c['params']}, "
            f"latency {b['latency_ms']:.2f} -> {c['latency_ms']:.2f} ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
