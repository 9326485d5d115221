"""Which pruned ResNet-50 *structures* are fast on a GPU: blocks dropped per stage x channels kept.

Random weights, structure only (Torch-Pruning magnitude importance, channels rounded to 8; dropped blocks
are identity-shortcut bottlenecks replaced by nn.Identity, which is exact when their branch is zero).
Each structure is timed as bench/compression.py times ResNet-50: batch 64, bf16, channels_last,
torch.compile(mode="reduce-overhead"), median of 30 CUDA-event timings after warm-up. It answers which
mix of depth and width reaches issue 4's ">= 3.2x fewer parameters with >= 2.5x lower latency"; the
product then chooses *which* blocks and channels by gradient importance (workers/compression/prune.py).

  python bench/resnet_structure_sweep.py [--out F.json] [--configs 3,4,6,3:1.0;2,2,3,2:0.6;...]
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpu_timing import cuda_median_ms  # noqa: E402

from workers.archs import ResNet50  # noqa: E402

STAGES = (3, 4, 6, 3)
DEFAULT = ("3,4,6,3:1.0;3,4,6,3:0.5;1,1,2,1:0.7;2,2,2,1:0.8;1,2,3,1:0.7;2,2,3,2:0.6;2,2,2,2:0.55;1,1,1,1:1.0;"
           "2,3,4,2:0.5;1,2,2,1:0.7")


def build(depth: tuple[int, ...], keep: float, device: str) -> nn.Module:
    import torch_pruning as tp

    model = ResNet50().eval()
    blocks, i = list(model.blocks), 0
    for stage, (total, kept) in enumerate(zip(STAGES, depth, strict=True)):
        if not 1 <= kept <= total:
            raise ValueError(f"stage {stage + 1} keeps {kept} of {total} blocks")
        for j in range(total):
            if j >= kept:  # the first block of a stage (with its downsample) always stays
                blocks[i + j] = nn.Identity()
        i += total
    model.blocks = nn.Sequential(*blocks)
    if keep < 1.0:
        example = torch.randn(1, 3, 224, 224)
        pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.MagnitudeImportance(p=1),
                                      pruning_ratio=1.0 - keep, ignored_layers=[model.fc], round_to=8)
        pruner.step()
    return model.to(device)


def pad_stem(model: nn.Module, channels: int) -> nn.Module:
    """Give the 7x7 stem conv `channels` input channels, the extra ones with zero weights: exact for an
    input padded with zeros, and a channel count the GPU's convolution kernels handle well (3 is not)."""
    conv = model.stem[0]
    wide = nn.Conv2d(channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=False)
    with torch.no_grad():
        wide.weight.zero_()
        wide.weight[:, : conv.in_channels] = conv.weight
    model.stem[0] = wide.to(conv.weight.device)
    return model


def profile(model: nn.Module, x: torch.Tensor, top: int) -> list[dict]:
    """The structure's top CUDA kernels by total time over 10 calls of the compiled model."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    m = model.to(torch.bfloat16).to(memory_format=torch.channels_last)
    torch._dynamo.reset()
    compiled = torch.compile(m, dynamic=False)  # the same kernels as reduce-overhead, without the CUDA graph
    with torch.inference_mode():
        for _ in range(3):
            compiled(x)
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                compiled(x)
            torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        total = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if total:
            rows.append({"kernel": ev.key[:90], "ms_per_call": round(total / 10 / 1000, 4), "count": ev.count // 10})
    rows.sort(key=lambda r: -r["ms_per_call"])
    return rows[:top]


def time_ms(model: nn.Module, x: torch.Tensor) -> float:
    m = model.to(torch.bfloat16).to(memory_format=torch.channels_last)
    torch._dynamo.reset()
    compiled = torch.compile(m, mode="reduce-overhead", dynamic=False)
    with torch.inference_mode():
        return cuda_median_ms(lambda: compiled(x), warmup=5, repeats=30)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--configs", default=DEFAULT, help="DEPTHS:KEEP;… with DEPTHS the blocks kept per stage")
    p.add_argument("--out")
    p.add_argument("--budget-s", type=float, default=420.0, help="stop starting new structures after this")
    p.add_argument("--stem-pad", type=int, default=0,
                   help="also time each structure with the stem padded to N input channels")
    p.add_argument("--profile", type=int, default=0, help="print each structure's top N kernels")
    p.add_argument("--s2d", default="", help="also time each structure with its stem rewritten as space-to-depth "
                   "(workers/compression/reparam.py), for each channel multiple listed, e.g. 1,8")
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("error: this sweep times structures on a CUDA GPU; none is here", file=sys.stderr)
        return 2
    began = time.perf_counter()
    x = torch.randn(64, 3, 224, 224, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    report = {"bench": "resnet_structure_sweep", "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
              "hardware": torch.cuda.get_device_name(), "torch": torch.__version__,
              "setting": "b64 bf16 channels_last torch.compile reduce-overhead, median of 30", "structures": []}
    base = None
    for spec in a.configs.split(";"):
        if time.perf_counter() - began > a.budget_s:
            report["stopped"] = f"budget of {a.budget_s} s reached"
            break
        depths, keep = spec.split(":")
        depth = tuple(int(d) for d in depths.split(","))
        t0 = time.perf_counter()
        model = build(depth, float(keep), "cuda")
        params = sum(q.numel() for q in model.parameters())
        ms = time_ms(model, x)
        row = {"blocks_per_stage": depth, "channel_keep": float(keep), "params": params, "latency_ms": round(ms, 3),
               "seconds": round(time.perf_counter() - t0, 1)}
        if a.profile:
            row["top_kernels"] = profile(model, x, a.profile)
        for multiple in [int(m) for m in a.s2d.split(",") if m]:
            from workers.compression.reparam import space_to_depth_stem

            rewritten = copy.deepcopy(model).float()
            space_to_depth_stem(rewritten, multiple)
            row[f"latency_ms_s2d_{multiple}"] = round(time_ms(rewritten, x), 3)
            del rewritten
        if a.stem_pad:
            xp = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, a.stem_pad - x.shape[1])).contiguous(
                memory_format=torch.channels_last)
            row[f"latency_ms_stem_padded_{a.stem_pad}"] = round(time_ms(pad_stem(model, a.stem_pad), xp), 3)
        if base is None and depth == STAGES and float(keep) == 1.0:
            base = row
        if base is not None:
            row["params_x"] = round(base["params"] / params, 3)
            row["latency_x"] = round(base["latency_ms"] / ms, 3)
            row["meets_3.2x_params_and_2.5x_latency"] = row["params_x"] >= 3.2 and row["latency_x"] >= 2.5
            for key in [k for k in row if k.startswith("latency_ms_s2d_")]:
                if key in base:
                    row["latency_x_" + key[len("latency_ms_"):]] = round(base[key] / row[key], 3)
            padded = f"latency_ms_stem_padded_{a.stem_pad}"
            if padded in row and padded in base:
                row["latency_x_stem_padded"] = round(base[padded] / row[padded], 3)
        report["structures"].append(row)
        print(json.dumps(row), flush=True)
        if a.out:
            Path(a.out).write_text(json.dumps(report, indent=1))
        del model
        torch.cuda.empty_cache()
    report["wall_s"] = round(time.perf_counter() - began, 1)
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
