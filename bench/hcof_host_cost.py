"""What HCOF's own reducer costs the host, on one GPU: no peer is needed to run all of its Python.

Eager BERT-base at batch 32 x 128 is bound by kernel launches (about 11 ms of GPU work in a 40 ms step on an
H200), so host time spent elsewhere is step time. HCOF's reducer adds a Python hook per parameter on the
backward thread and a communication thread that issues each codec's tensor operations, and the two share the
GIL. This measures that cost without a network: in one process, with a one-rank NCCL group standing in for the
inter-node level, a "loopback" reducer runs the full compressed exchange of every bucket (error feedback,
encode, the all-to-all and all-gather — identities on one rank, but real NCCL calls — decode), so the host does
everything a two-node int4 step does except wait for the wire. Variants run in interleaved rounds, each in a
fresh model, and the step time is the median of each run's timed steps (median over rounds).

  python bench/hcof_host_cost.py [--steps 50] [--rounds 3] [--batch-size 32] [--out F.json]

Each run also reports the held-out loss it reached (`eval_loss`): with --steps 300 --batch-size 64 that is
what a codec's compression error (with error feedback) does to convergence, one process standing in for two.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from workers.training.hcof.reducer import HcofReducer  # noqa: E402

VARIANTS = {
    # name: (reducer, codec)
    "plain": (None, None),
    "own-reducer-no-exchange": ("own", "none"),
    "own-reducer-int4-loopback": ("loopback", "int4"),
    "own-reducer-int4-loopback-graphs": ("loopback-graphs", "int4"),
    "own-reducer-topk1%-loopback": ("loopback", "topk:0.01"),
    "own-reducer-topk1%-loopback-graphs": ("loopback-graphs", "topk:0.01"),
    # 100 MB buckets: 5 instead of 17, so a third of the per-bucket host work (and less overlap).
    "own-reducer-int4-loopback-graphs-b100": ("loopback-graphs", "int4", 100.0),
}


def run_variant(name: str, steps: int, warmup: int, device, batch: int = 32) -> dict:
    from workers.training.hcof.codecs import Plain, parse_codec
    from workers.training.hcof.collectives import LevelExchanger
    from workers.training.hcof.critical import CriticalPolicy
    from workers.training.hcof.topology import LevelGroup
    from workers.training.loop import _null
    from workers.training.models import build_task

    kind, codec_name, *rest = VARIANTS[name]
    bucket_mb = rest[0] if rest else 25.0
    task = build_task("bert-base", batch, 128, device, 0)
    model = task.model
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if cuda else {}))
    reducer = None
    if kind:
        import torch.distributed as dist

        codec = parse_codec(codec_name)
        backend = dist.get_backend()
        groups = {"intra_node": LevelGroup("intra_node", None, 1, 0, backend),
                  "inter_node": LevelGroup("inter_node", dist.group.WORLD, 1, 0, backend),
                  "cross_rack": LevelGroup("cross_rack", None, 1, 0, backend)}
        codecs = {"intra_node": Plain("none"), "inter_node": codec, "cross_rack": codec, "critical": Plain("none")}
        policy = CriticalPolicy.parse("bias,norm,embedding,small:1024")
        reducer = Loopback(model, LevelExchanger(groups, device), codecs, policy, 1, device, bucket_mb=bucket_mb)
        reducer.loop = kind.startswith("loopback")
        reducer.loop_graphs = kind == "loopback-graphs"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else _null()
    times = []
    for step in range(steps):
        if reducer and step == warmup:
            reducer.host_s = {"hooks": 0.0, "exchange": 0.0}
        t0 = time.perf_counter()
        if reducer:
            reducer.start_step()
        with autocast:
            loss = task.loss(model, task.batch(step, 0, 1))
        loss.backward()
        if reducer:
            reducer.finish()
        opt.step()
        if reducer:
            reducer.zero_grad()
        else:
            opt.zero_grad(set_to_none=False)
        loss.item()
        if reducer and cuda:
            reducer.timings()  # clears the exchange's timing events, as the training loop does each step
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    out = {"step_ms": round(1000 * statistics.median(times), 3), "mean_ms": round(1000 * statistics.fmean(times), 3),
           "loss": round(float(loss), 4), "eval_loss": round(task.eval_loss(model, autocast), 4)}
    if reducer:
        out["buckets"] = len(reducer.buckets)
        out["error_feedback_slots"] = len(reducer.ex.ef.residuals)  # > 0: the codec really ran on every bucket
        timed = max(1, steps - warmup)
        # Host time inside the parameter hooks (backward thread) and the buckets' exchanges (communication thread).
        out["host_ms_per_step"] = {k: round(1000 * v / timed, 3) for k, v in reducer.host_s.items()}
    del model, opt, reducer, task
    if cuda:
        torch.cuda.empty_cache()
    return out


class Loopback(HcofReducer):
    """HCOF's reducer with its host time summed: inside the parameter hooks (backward thread) and the buckets'
    exchanges (communication thread). With `loop`, it runs the inter-node compressed reduce-scatter and
    all-gather on every compressed bucket, as a two-node int4 step does, on a one-rank group (the collectives
    are real NCCL calls that move nothing); with `loop_graphs`, from the second step through the CUDA-graph
    path (graphed.py), as a real run does."""

    loop = False
    loop_graphs = False

    def __init__(self, *args, **kwargs) -> None:
        self.host_s = {"hooks": 0.0, "exchange": 0.0}
        super().__init__(*args, **kwargs)  # registers the hooks: bound to this class's _on_grad

    def _on_grad(self, p) -> None:
        t = time.perf_counter()
        super()._on_grad(p)
        self.host_s["hooks"] += time.perf_counter() - t

    def _reduce(self, b) -> None:
        t = time.perf_counter()
        self._exchange(b)
        self.host_s["exchange"] += time.perf_counter() - t

    def _exchange(self, b) -> None:
        if not self.loop or b.kind != "compressed":
            super()._reduce(b)
            return
        lg, codec, key = self.ex.groups["inter_node"], self.codecs["inter_node"], f"b{b.index}"
        if self.loop_graphs and self._steps_started > 1:
            self.run_graphed(b, lg, None)  # the reducer's own graph path, on the one-rank group
            return
        piece = self.ex.reduce_scatter(b.flat, lg, codec, key)
        b.flat.copy_(self.ex.all_gather(piece, lg, codec, key))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32, help="per step (64: a two-process run's global batch)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out")
    p.add_argument("--smoke", action="store_true", help="on CPU (gloo), to check the code path; times mean nothing")
    a = p.parse_args()
    import torch.distributed as dist

    if not a.smoke and not torch.cuda.is_available():
        print("error: bench/hcof_host_cost.py needs a CUDA GPU (it measures the host cost beside GPU launches)",
              file=sys.stderr)
        return 2
    unknown = [v for v in a.variants.split(",") if v not in VARIANTS]
    if unknown:
        print(f"error: unknown variants {', '.join(unknown)}; known: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29631")
    if a.smoke:
        device = torch.device("cpu")
        dist.init_process_group("gloo", rank=0, world_size=1)
    else:
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=0, world_size=1, device_id=device)
    names = a.variants.split(",")
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(a.rounds):
        for n in names:
            runs[n].append(run_variant(n, a.steps, a.warmup, device, a.batch_size))
            print(json.dumps({"round": r + 1, "variant": n, **runs[n][-1]}), file=sys.stderr, flush=True)
    plain = statistics.median(x["step_ms"] for x in runs["plain"]) if "plain" in runs else None
    summary = {}
    for n, xs in runs.items():
        med = statistics.median(x["step_ms"] for x in xs)
        summary[n] = {"step_ms": round(med, 3), "rounds_ms": [x["step_ms"] for x in xs]}
        if plain:
            summary[n]["host_cost_ms_over_plain"] = round(med - plain, 3)
    report = {"bench": "hcof_host_cost", "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
              "hardware": "cpu (smoke)" if a.smoke else torch.cuda.get_device_name(0), "torch": torch.__version__,
              "model": f"bert-base, batch {a.batch_size} x 128, bf16 autocast, fused AdamW, synthetic tokens",
              "steps": a.steps, "warmup": a.warmup, "rounds": a.rounds, "summary": summary, "runs": runs}
    dist.destroy_process_group()
    text = json.dumps(report, indent=1)
    if a.out:
        Path(a.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
