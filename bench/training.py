"""Benchmark HCOF against the DDP baselines; prints one JSON object (and writes it with --out).

Every variant runs in its own `python -m workers.training` launch (a DDP model with a comm hook must not
share a process with another one), with the same model, batch, steps and data, so final losses compare.

  python bench/training.py --preset cpu-digits            # 2 nodes x 2 gloo processes, real digits data
  python bench/training.py --preset h200x2 --out F.json   # BERT-base on 2 GPUs: NVLink, then forced onto sockets

The BERT loss needs about 300 steps to settle (training-2026-11-29-h200-bert-convergence.json: two identical
300-step runs end 1.1 % apart in held-out loss), so the socket comparison (speed and loss) runs 300 steps once; the
NVLink one is about speed within 3 %, under a machine whose identical processes differ by up to 10 % in step time,
so it runs fewer steps, several times, interleaved:

  python bench/training.py --preset h200x2 --only socket/ddp-fp32,socket/ddp-fp32-repeat,... --steps 300
  python bench/training.py --preset h200x2 --only nvlink/ddp-fp32,nvlink/ddp-bf16,... --steps 100 --repeats 3
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOCKET_ENV = {"NCCL_P2P_DISABLE": "1", "NCCL_SHM_DISABLE": "1", "NCCL_NET": "Socket", "NCCL_IB_DISABLE": "1",
              "NCCL_SOCKET_IFNAME": "lo"}

PRESETS = {
    "cpu-digits": {
        "model": "digits-mlp", "nodes": 2, "procs_per_node": 2, "backend": "gloo", "steps": 300, "extra": [],
        "settings": {"gloo-cpu": {
            "env": {},
            "variants": {
                "ddp-fp32": ["--hcof", "off"],
                "ddp-bf16": ["--hcof", "off", "--ddp-hook", "bf16"],
                "ddp-powersgd4": ["--hcof", "off", "--ddp-hook", "powersgd:4"],
                "hcof-fp32": ["--hcof", "intra_node=none,inter_node=none"],
                "hcof-int8": ["--hcof", "intra_node=none,inter_node=int8"],
                "hcof-int4": ["--hcof", "intra_node=none,inter_node=int4"],
                "hcof-topk1%": ["--hcof", "intra_node=none,inter_node=topk:0.01"],
            }}},
    },
    "h200x2": {
        "model": "bert-base", "nodes": 2, "procs_per_node": 1, "backend": "nccl", "steps": 300,
        "extra": ["--batch-size", "32", "--seq-len", "128"],
        "settings": {
            "socket": {"env": SOCKET_ENV, "variants": {
                "ddp-fp32": ["--hcof", "off"],
                # The same run again: the noise floor of step time and loss that every comparison sits on.
                "ddp-fp32-repeat": ["--hcof", "off"],
                "ddp-bf16": ["--hcof", "off", "--ddp-hook", "bf16"],
                "ddp-powersgd4": ["--hcof", "off", "--ddp-hook", "powersgd:4"],
                "hcof-int4": ["--hcof", "inter_node=int4"],
                "hcof-int8": ["--hcof", "inter_node=int8"],
                "hcof-topk1%": ["--hcof", "inter_node=topk:0.01"],
                # Larger buckets on the slow link: fewer collectives, each paying the socket latency once.
                "hcof-int8-b100": ["--hcof", "inter_node=int8", "--bucket-mb", "100"],
                "hcof-int4-b100": ["--hcof", "inter_node=int4", "--bucket-mb", "100"],
                "hcof-int4-gloo": ["--hcof", "inter_node=int4", "--inter-backend", "gloo"],
                # The eager codec path, for comparison with the CUDA-graphed one (the default).
                "hcof-int4-eager": ["--hcof", "inter_node=int4", "--codec-graphs", "off"],
            }},
            "nvlink": {"env": {}, "variants": {
                "ddp-fp32": ["--hcof", "off"],
                "ddp-bf16": ["--hcof", "off", "--ddp-hook", "bf16"],
                "ddp-powersgd4": ["--hcof", "off", "--ddp-hook", "powersgd:4"],
                "hcof-fp32": ["--hcof", "inter_node=none"],
                "hcof-fp32-b50": ["--hcof", "inter_node=none", "--bucket-mb", "50"],
                # DDP's bf16 hook was the best NVLink baseline in one run (41.5 ms against fp32's 53.1): the
                # same halving of bytes, in HCOF's reducer. Not yet measured (needs the two-GPU machine).
                "hcof-bf16": ["--hcof", "inter_node=bf16"],
                "hcof-bf16-b50": ["--hcof", "inter_node=bf16", "--bucket-mb", "50"],
            }},
        },
    },
    # Issue 8: 2 emulated nodes x 2 GPUs; NVLink inside a node, the cross-node exchange on gloo sockets.
    "h200x4": {
        "model": "bert-base", "nodes": 2, "procs_per_node": 2, "backend": "nccl", "steps": 30,
        "extra": ["--batch-size", "32", "--seq-len", "128"],
        "settings": {
            # Everything on sockets: what DDP's flat ring gets when the cross-node link is slow (the
            # process-wide NCCL settings also slow its intra-node hops, and HCOF's: pessimistic for both).
            "socket": {"env": SOCKET_ENV, "variants": {
                "ddp-fp32": ["--hcof", "off"],
                "ddp-bf16": ["--hcof", "off", "--ddp-hook", "bf16"],
                "ddp-powersgd4": ["--hcof", "off", "--ddp-hook", "powersgd:4"],
                "hcof-int4": ["--hcof", "intra_node=none,inter_node=int4"],
                "hcof-topk1%": ["--hcof", "intra_node=none,inter_node=topk:0.01"],
            }},
            # The setting: NVLink inside each emulated node, the cross-node group on gloo sockets.
            "nvlink-intra/gloo-inter": {"env": {}, "variants": {
                "hcof-int4": ["--hcof", "intra_node=none,inter_node=int4", "--inter-backend", "gloo"],
                "hcof-topk1%": ["--hcof", "intra_node=none,inter_node=topk:0.01", "--inter-backend", "gloo"],
            }},
            "nvlink": {"env": {}, "variants": {
                "ddp-fp32": ["--hcof", "off"],
            }},
        },
    },
}


def run_one(name: str, args: list[str], env_extra: dict, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "workers.training", *args, "--json"]
    env = dict(os.environ, **env_extra, PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"name": name, "ok": False, "error": f"timed out after {timeout:.0f} s", "command": " ".join(args)}
    wall = time.perf_counter() - start
    final = None
    for line in proc.stdout.splitlines():
        if line.startswith("{") and '"type": "final"' in line:
            final = json.loads(line)
    out = {"name": name, "ok": proc.returncode == 0 and final is not None, "wall_s": round(wall, 1),
           "command": "python -m workers.training " + " ".join(args),
           "env": env_extra or None, "result": final}
    if not out["ok"]:
        out["error"] = (proc.stderr or proc.stdout)[-1500:]
    return out


def goals(preset: str, runs: dict[str, dict]) -> dict:
    def res(key):
        r = runs.get(key)
        return r["result"] if r and r.get("ok") else None

    def loss(r):
        # The held-out loss where the task has one (it does not depend on which batches the last steps drew).
        return r["eval_loss"] if r.get("eval_loss") is not None else r["final_loss"]

    def rel(a, b):
        return round(abs(loss(a) - loss(b)) / loss(b), 4)

    g: dict = {"loss_compared": "eval_loss (held-out batches) where reported, else the mean of the last 10 "
                                "training losses; step times are medians of the timed steps"}
    if preset == "cpu-digits":
        ref, int4, fp32h = res("gloo-cpu/ddp-fp32"), res("gloo-cpu/hcof-int4"), res("gloo-cpu/hcof-fp32")
        if ref and int4:
            gap = 100 * (ref["final_accuracy"] - int4["final_accuracy"])
            g["accuracy_points_below_uncompressed_int4"] = round(gap, 3)
            g["accuracy_within_0.5_points"] = gap <= 0.5
        if fp32h and int4:
            ratio = fp32h["bytes_by_level"]["inter_node"] / max(1, int4["bytes_by_level"]["inter_node"])
            g["inter_node_bytes_fp32_over_int4"] = round(ratio, 3)
            g["inter_node_bytes_7x_fewer"] = ratio >= 7
        if ref and int4:
            g["inter_node_bytes_ddp_fp32_modelled_over_int4"] = round(
                ref["bytes_by_level"]["inter_node"] / max(1, int4["bytes_by_level"]["inter_node"]), 3)
    else:
        for setting in ("nvlink", "socket", "socket-inter"):
            base = {k: res(f"{setting}/{k}") for k in ("ddp-fp32", "ddp-bf16", "ddp-powersgd4")}
            repeat = res(f"{setting}/ddp-fp32-repeat")
            hcof = {k.split("/", 1)[1]: r["result"] for k, r in runs.items()
                    if k.startswith(setting + "/hcof") and r.get("ok")}
            if not hcof or not base["ddp-fp32"]:
                continue
            best_name, best = min(hcof.items(), key=lambda kv: kv[1]["step_time_s"])
            fp32 = base["ddp-fp32"]
            entry = {"best_hcof": best_name, "best_hcof_engine": best.get("engine"),  # ddp: one uncompressed level
                     "hcof_step_ms": round(1000 * best["step_time_s"], 2),
                     "ddp_fp32_step_ms": round(1000 * fp32["step_time_s"], 2),
                     "speedup_vs_ddp_fp32": round(fp32["step_time_s"] / best["step_time_s"], 3),
                     "loss_rel_diff_vs_ddp_fp32": rel(best, fp32),
                     "scaling_efficiency": best.get("scaling_efficiency")}
            if repeat:
                entry["noise_floor_ddp_fp32_repeat"] = {
                    "step_time_rel_diff": round(
                        abs(repeat["step_time_s"] - fp32["step_time_s"]) / fp32["step_time_s"], 4),
                    "loss_rel_diff": rel(repeat, fp32)}
            if base["ddp-bf16"]:
                entry["ddp_bf16_step_ms"] = round(1000 * base["ddp-bf16"]["step_time_s"], 2)
                entry["speedup_vs_ddp_bf16"] = round(base["ddp-bf16"]["step_time_s"] / best["step_time_s"], 3)
            best_ddp = min((b["step_time_s"] for b in [*base.values(), repeat] if b), default=None)
            if setting == "nvlink":
                entry["no_slower_than_best_ddp_by_3pct"] = best["step_time_s"] <= 1.03 * best_ddp
            else:
                entry["2.1x_faster_than_ddp_fp32"] = entry["speedup_vs_ddp_fp32"] >= 2.1
                entry["1.3x_faster_than_ddp_bf16"] = entry.get("speedup_vs_ddp_bf16", 0) >= 1.3
                entry["loss_within_2pct"] = entry["loss_rel_diff_vs_ddp_fp32"] <= 0.02
                # The fastest variant need not be the one at equal loss: every variant against all three.
                per = {}
                for name, r in hcof.items():
                    row = {"step_ms": round(1000 * r["step_time_s"], 2),
                           "speedup_vs_ddp_fp32": round(fp32["step_time_s"] / r["step_time_s"], 3),
                           "loss_rel_diff_vs_ddp_fp32": rel(r, fp32)}
                    if base["ddp-bf16"]:
                        row["speedup_vs_ddp_bf16"] = round(base["ddp-bf16"]["step_time_s"] / r["step_time_s"], 3)
                    # One-sided, for the reader: a codec that ends *lower* than DDP is not worse (the goal's
                    # "within 2 %" is two-sided and stays the check).
                    row["loss_no_worse_than_2pct"] = loss(r) <= 1.02 * loss(fp32)
                    row["meets_all_three"] = (row["speedup_vs_ddp_fp32"] >= 2.1
                                              and row.get("speedup_vs_ddp_bf16", 0) >= 1.3
                                              and row["loss_rel_diff_vs_ddp_fp32"] <= 0.02)
                    per[name] = row
                entry["variants"] = per
                entry["any_variant_meets_all_three"] = any(r["meets_all_three"] for r in per.values())
            entry["moonshot_efficiency_0.82"] = (best.get("scaling_efficiency") or 0) >= 0.82
            g[setting] = entry
    return g


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-digits")
    p.add_argument("--steps", type=int)
    p.add_argument("--only", help="comma-separated setting/variant names to run")
    p.add_argument("--repeats", type=int, default=1, help="runs of each variant, in interleaved rounds")
    p.add_argument("--timeout", type=float, default=240.0, help="seconds per launch")
    p.add_argument("--out", help="also write the JSON here (rewritten after every run)")
    p.add_argument("--hardware", default="", help="a words-only description of the machine, for the record")
    p.add_argument("--lr-warmup", type=int,
                   help="passed to every run: steps of learning-rate warm-up (default: the model's; bert-base 50)")
    a = p.parse_args()
    preset = PRESETS[a.preset]
    steps = a.steps or preset["steps"]
    common = ["--model", preset["model"], "--steps", str(steps), "--backend", preset["backend"], *preset["extra"]]
    if a.lr_warmup is not None:
        common += ["--lr-warmup", str(a.lr_warmup)]
    report = {"bench": "training", "preset": a.preset, "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
              "hardware": a.hardware or platform.node(), "steps": steps, "repeats": a.repeats,
              "lr_warmup": a.lr_warmup if a.lr_warmup is not None else "the model's default (each run's record)",
              "runs": {}}
    only = set(a.only.split(",")) if a.only else None

    def save() -> None:
        if a.out:
            Path(a.out).write_text(json.dumps(report, indent=1))

    single = run_one("single", [*common, "--nodes", "1", "--procs-per-node", "1", "--hcof", "off"], {}, a.timeout)
    report["runs"]["single"] = single
    save()
    sps = single["result"]["samples_per_s"] if single.get("ok") else None
    topo = ["--nodes", str(preset["nodes"]), "--procs-per-node", str(preset["procs_per_node"])]
    chosen = [(f"{setting}/{variant}", vargs, spec["env"]) for setting, spec in preset["settings"].items()
              for variant, vargs in spec["variants"].items() if not only or f"{setting}/{variant}" in only]
    # With --repeats N every variant runs N times, in rounds (A B C, A B C, ...), so that a slow spell of the
    # machine falls on all variants alike; a variant's step time is then the median of its runs' medians.
    attempts: dict[str, list[dict]] = {key: [] for key, _, _ in chosen}
    for round_ in range(a.repeats):
        for key, vargs, env in chosen:
            extra = ["--single-samples-per-s", str(sps)] if sps else []
            run = run_one(key, [*common, *topo, *vargs, *extra], env, a.timeout)
            attempts[key].append(run)
            report["runs"][key] = _combine(attempts[key])
            print(json.dumps({"run": key, "round": round_ + 1, "ok": run["ok"],
                              "step_s": (run.get("result") or {}).get("step_time_s")}), file=sys.stderr, flush=True)
            save()
    report["goals"] = goals(a.preset, report["runs"])
    report["summary"] = {k: _brief(r) for k, r in report["runs"].items()}
    save()
    print(json.dumps(report["summary"] | {"goals": report["goals"]}, indent=1))
    return 0


def _combine(runs: list[dict]) -> dict:
    """One variant's runs as one: the first good run's result with the median step time over the good runs (and
    samples/s, scaling efficiency from it), and every run's figures under `repeats`."""
    if len(runs) == 1:
        return runs[0]
    good = [r for r in runs if r.get("ok")]
    out = dict(good[0] if good else runs[-1])
    out["repeats"] = [{"ok": r.get("ok"), "wall_s": r.get("wall_s"), "error": r.get("error"),
                       **{k: (r.get("result") or {}).get(k) for k in ("step_time_s", "eval_loss", "final_loss")}}
                      for r in runs]
    if good:
        res = dict(good[0]["result"])
        first = res["step_time_s"]
        res["step_time_s"] = round(statistics.median(r["result"]["step_time_s"] for r in good), 6)
        res["step_time_is"] = f"median over {len(good)} runs of each run's median step, slowest rank"
        if res.get("samples_per_s"):
            res["samples_per_s"] = round(res["samples_per_s"] * first / res["step_time_s"], 2)
        if res.get("scaling_efficiency"):
            res["scaling_efficiency"] = round(res["scaling_efficiency"] * first / res["step_time_s"], 4)
        times = [r["result"]["step_time_s"] for r in good]
        res["step_time_spread"] = round((max(times) - min(times)) / res["step_time_s"], 4)
        out["result"] = res
    return out


def _brief(run: dict) -> dict:
    r = run.get("result") or {}
    keys = ("step_time_s", "step_time_mean_s", "samples_per_s", "final_loss", "eval_loss", "final_accuracy",
            "scaling_efficiency", "comm_share",
            "overlap_ratio", "bytes_per_step_by_level", "step_time_spread")
    return {"ok": run.get("ok"), **{k: r[k] for k in keys if k in r}}


if __name__ == "__main__":
    sys.exit(main())
