"""`python -m workers.training.hcof.selfcheck --nodes K --procs-per-node P`: the hierarchical exchange checked
against a plain all-reduce on real process groups, codec by codec, with the bytes each level sent.

Prints one JSON object (rank 0). Run it on a new cluster or backend before trusting the training numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import timedelta


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m workers.training.hcof.selfcheck")
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--procs-per-node", type=int, default=2)
    p.add_argument("--racks", type=int, default=1)
    p.add_argument("--backend", default="gloo", choices=("gloo", "nccl"))
    p.add_argument("--inter-backend", choices=("gloo", "nccl"))
    p.add_argument("--elements", type=int, default=1 << 16, help="per-rank vector length before padding")
    p.add_argument("--rounds", type=int, default=20, help="repeated rounds for the error-feedback check")
    p.add_argument("--master-addr", default="127.0.0.1")
    p.add_argument("--master-port", type=int, default=0)
    p.add_argument("--node-rank", type=int)
    return p.parse_args(argv)


def _check(args: argparse.Namespace) -> dict:
    import torch
    import torch.distributed as dist

    from .codecs import CHUNK, Plain, parse_codec
    from .collectives import LevelExchanger, hierarchical_all_reduce, sparse_rows_hierarchical
    from .topology import LEVELS, Topology, build_level_groups

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    topo = Topology.emulated(args.nodes, args.procs_per_node, args.racks)
    # Emulated nodes share the host's GPUs: one GPU per rank.
    device = torch.device("cuda", rank % torch.cuda.device_count()) if args.backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(args.backend, rank=rank, world_size=world, timeout=timedelta(seconds=60))
    inter = args.inter_backend or args.backend
    groups = build_level_groups(topo, rank, {"intra_node": args.backend, "inter_node": inter, "cross_rack": inter},
                                timedelta(seconds=60))
    n = -(-args.elements // (world * CHUNK)) * world * CHUNK
    gen = torch.Generator().manual_seed(rank)
    x = (torch.randn(n, generator=gen) * torch.logspace(0, -3, n)).to(device)  # magnitudes spread like gradients
    ref = x.clone()
    dist.all_reduce(ref)

    def identical(t: torch.Tensor) -> bool:
        lo, hi = t.double().sum().clone(), t.double().sum().clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        return bool(lo == hi)

    def rel(a: torch.Tensor) -> float:
        return float((a - ref).norm() / ref.norm())

    report: dict = {"world_size": world, "topology": topo.describe(), "elements": n, "codecs": {}}
    outer = [lv for lv in LEVELS if groups[lv].size > 1]
    for name in ("none", "bf16", "int8", "int4", "topk:0.05", "powersgd:4"):
        codec = parse_codec(name)
        codecs = {lv: Plain("none") for lv in LEVELS}
        for lv in outer[1:] if len(outer) > 1 else outer:  # the slow levels take the codec; the node stays exact
            codecs[lv] = codec
        ex = LevelExchanger(groups, device)
        first = hierarchical_all_reduce(ex, x.clone(), codecs, "t")
        bytes_one = dict(ex.bytes)
        total = first.clone()
        for _ in range(args.rounds - 1):
            total += hierarchical_all_reduce(ex, x.clone(), codecs, "t")
        report["codecs"][name] = {
            "levels": {lv: codecs[lv].name for lv in LEVELS},
            "rel_error_one_round": rel(first),
            "rel_error_mean_of_rounds": rel(total / args.rounds),
            "bytes_by_level": {lv: _sum_int(bytes_one[lv], device) for lv in LEVELS},
            "replicas_identical": identical(first),
        }
    # The staged exchange that compressed buckets replay from CUDA graphs (graphed.py), run uncaptured here:
    # the same results, residuals and bytes as the eager exchange, round after round of error feedback.
    from .graphed import GraphedExchange

    if len(outer) == 1 or (len(outer) == 2 and outer[0] == "intra_node"):  # the shapes graphed.py handles
        codec = parse_codec("int4")
        codecs = {lv: Plain("none") for lv in LEVELS} | {outer[-1]: codec}
        eager_ex, staged_ex = LevelExchanger(groups, device), LevelExchanger(groups, device)
        intra = groups["intra_node"] if len(outer) == 2 else None
        flat = torch.empty_like(x)
        staged = None
        worst, same_residuals = 0.0, True
        for r in range(5):
            xr = x * (1 + 0.1 * r)
            want = hierarchical_all_reduce(eager_ex, xr.clone(), codecs, "g")
            flat.copy_(xr)
            if staged is None:
                staged = GraphedExchange(staged_ex, flat, codec, groups[outer[-1]], intra, "g", None,
                                         capture=False)
            got = staged.run()
            worst = max(worst, float((got - want).abs().max()))
        for slot, res in eager_ex.ef.residuals.items():
            same_residuals &= bool(torch.equal(staged_ex.ef.residuals[slot], res))
        report["staged_exchange"] = {
            "levels": [lv for lv in outer], "codec": "int4", "rounds": 5, "max_abs_difference": worst,
            "residuals_identical": same_residuals,
            "bytes_identical": all(eager_ex.bytes[lv] == staged_ex.bytes[lv] for lv in LEVELS),
        }
    # Embedding-like gradient: each rank touches a few rows; exchanged exactly, as (row index, row) pairs.
    rows, cols = 4096, 64
    emb = torch.zeros(rows, cols)
    touched = torch.randint(0, rows, (rows // 50,), generator=gen)
    emb[touched] = torch.randn(len(touched), cols, generator=gen)
    emb = emb.to(device).reshape(-1)
    emb_ref = emb.clone()
    dist.all_reduce(emb_ref)
    ex = LevelExchanger(groups, device)
    got = sparse_rows_hierarchical(ex, emb.clone(), Plain("none"), cols)
    report["sparse_rows"] = {
        "max_abs_error": float((got - emb_ref).abs().max()),
        "bytes_by_level": {lv: _sum_int(ex.bytes[lv], device) for lv in LEVELS},
        "dense_fp32_allreduce_bytes": 2 * (world - 1) * emb.numel() * 4,
    }
    # Between nodes left at `none` (fast links) the same gradient goes dense: exact too, with no host sync.
    ex = LevelExchanger(groups, device)
    got = sparse_rows_hierarchical(ex, emb.clone(), Plain("none"), cols, sparse_levels=())
    report["dense_rows"] = {
        "max_abs_error": float((got - emb_ref).abs().max()),
        "bytes_by_level": {lv: _sum_int(ex.bytes[lv], device) for lv in LEVELS},
    }
    dist.barrier()
    dist.destroy_process_group()
    return report


def _sum_int(value: int, device) -> int:
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return int(t.item())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        report = _check(args)
        if int(os.environ["RANK"]) == 0:
            print(json.dumps(report), flush=True)
        return 0
    from ..launch import launch
    from .topology import Topology

    return launch(_Launch(args, Topology.emulated(args.nodes, args.procs_per_node, args.racks)), argv,
                  module="workers.training.hcof.selfcheck")


class _Launch:
    def __init__(self, args: argparse.Namespace, topology) -> None:
        self.args, self.topology = args, topology

    def __getattr__(self, name):
        return getattr(self.args, name)


if __name__ == "__main__":
    sys.exit(main())
