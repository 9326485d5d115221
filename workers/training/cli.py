"""Command line of `python -m workers.training`: parsing and every check that must fail before a process starts."""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

from .catalog import DEFAULT_LR_WARMUP, MODELS
from .hcof.codecs import Codec, CodecError, Plain, PowerSGD, parse_codec
from .hcof.critical import CriticalPolicy
from .hcof.topology import LEVELS, Topology, TopologyError

HCOF_LEVELS = (*LEVELS, "critical")


class UsageError(ValueError):
    """Bad input: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one clear line instead of usage + message
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m workers.training", description="Data-parallel training with HCOF gradient exchange.")
    p.add_argument("--model", required=True, choices=MODELS)
    p.add_argument("--nodes", type=int, help="nodes to emulate on this host (default 1)")
    p.add_argument("--procs-per-node", type=int, help="processes (GPUs) per node (default 1)")
    p.add_argument("--racks", type=int, default=1, help="racks the emulated nodes are spread over")
    p.add_argument("--topology", help="allocation as JSON text or a JSON file: {nodes: [{name, rack, gpus}]}")
    p.add_argument("--node-rank", type=int, help="start only this node's processes (one launch per node)")
    p.add_argument("--master-addr", default="127.0.0.1")
    p.add_argument("--master-port", type=int, default=0, help="rendezvous port (0: pick a free one; single host)")
    p.add_argument("--backend", choices=("gloo", "nccl"))
    p.add_argument("--inter-backend", choices=("gloo", "nccl"),
                   help="backend of the inter-node and cross-rack groups (default: --backend)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, help="per process")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (image side for resnet50)")
    p.add_argument("--lr", type=float)
    p.add_argument("--lr-warmup", type=int,
                   help="steps over which the learning rate rises linearly to --lr (0: none; default per model)")
    p.add_argument("--hcof", default="off",
                   help="off, or LEVEL=CODEC[,LEVEL=CODEC...]; levels: " + ", ".join(HCOF_LEVELS))
    p.add_argument("--ddp-hook", default="none", help="with --hcof off: none, bf16 or powersgd:RANK")
    p.add_argument("--critical", default="bias,norm,embedding,small:1024",
                   help="tensors never compressed lossily: bias, norm, embedding, small:N")
    p.add_argument("--bucket-mb", type=float, default=25.0)
    p.add_argument("--first-bucket-mb", type=float, default=1.0)
    p.add_argument("--checkpoint-dir")
    p.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (0: only at the end)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --checkpoint-dir")
    p.add_argument("--pg-timeout", type=float, default=45.0, help="seconds a collective may wait for a peer")
    p.add_argument("--warmup-steps", type=int, help="first steps left out of the timings")
    p.add_argument("--single-samples-per-s", type=float, help="a 1-process run's throughput, for scaling_efficiency")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--codec-graphs", choices=("on", "off"), default="on",
                   help="replay compressed buckets' codec work from CUDA graphs (GPU, NCCL; default on)")
    p.add_argument("--profile-dir", help="write a torch.profiler trace (trace.json) and op table (ops.txt) of rank 0")
    p.add_argument("--profile-steps", type=int, default=3, help="steps the profiler records after the warm-up")
    p.add_argument("--json", action="store_true", help="JSON lines per step and a final JSON object")
    return p


@dataclass
class Config:
    args: argparse.Namespace
    topology: Topology
    hcof: dict[str, Codec] | None
    ddp_hook: str
    critical: CriticalPolicy

    def __getattr__(self, name):
        return getattr(self.args, name)


def parse_hcof(text: str, topology: Topology) -> dict[str, Codec] | None:
    if text.strip() == "off":
        return None
    codecs: dict[str, Codec] = {}
    for item in text.split(","):
        level, eq, codec = item.partition("=")
        level = level.strip()
        if not eq or level not in HCOF_LEVELS:
            raise UsageError(f"--hcof expects LEVEL=CODEC with LEVEL in {', '.join(HCOF_LEVELS)}; got {item!r}")
        codecs[level] = parse_codec(codec)
    codecs.setdefault("intra_node", Plain("none"))
    codecs.setdefault("inter_node", Plain("none"))
    codecs.setdefault("cross_rack", codecs["inter_node"])
    codecs.setdefault("critical", Plain("none"))
    if codecs["critical"].name not in ("none", "bf16"):
        raise UsageError(f"critical tensors are never compressed lossily: critical takes none or bf16, "
                         f"not {codecs['critical'].name}")
    sizes = {lv: topology.level_size(lv) for lv in LEVELS}
    used = [lv for lv in LEVELS if sizes[lv] > 1]
    for lv in LEVELS:
        if isinstance(codecs[lv], PowerSGD) and lv in used and lv != used[-1]:
            raise UsageError(f"powersgd can only be the outermost level's codec ({used[-1]} here), not {lv}'s")
    return codecs


def parse(argv: list[str]) -> Config:
    args = build_parser().parse_args(argv)
    try:
        if args.topology:
            topology = Topology.from_spec(args.topology)
            if args.nodes is not None or args.procs_per_node is not None:
                asked = (args.nodes or 1) * (args.procs_per_node or 1)
                if asked != topology.world_size:
                    raise UsageError(f"world size {asked} (--nodes x --procs-per-node) does not match the "
                                     f"topology's {topology.world_size} processes")
        else:
            topology = Topology.emulated(args.nodes or 1, args.procs_per_node or 1, args.racks)
        hcof = parse_hcof(args.hcof, topology)
        critical = CriticalPolicy.parse(args.critical)
    except (TopologyError, CodecError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    env_world = os.environ.get("WORLD_SIZE")
    if env_world is not None and int(env_world) != topology.world_size:
        raise UsageError(f"world size {env_world} (from the launcher) does not match the topology's "
                         f"{topology.world_size} processes")
    hook = args.ddp_hook.strip()
    if hook != "none":
        if hcof is not None:
            raise UsageError("--ddp-hook is a baseline for plain DDP: use it with --hcof off")
        name, _, rank = hook.partition(":")
        if not (hook == "bf16" or (name == "powersgd" and rank.isdigit() and int(rank) > 0)):
            raise UsageError(f"--ddp-hook takes none, bf16 or powersgd:RANK, not {hook!r}")
    if args.steps < 1:
        raise UsageError("--steps must be at least 1")
    if args.lr_warmup is None:
        args.lr_warmup = DEFAULT_LR_WARMUP.get(args.model, 0)
    if args.lr_warmup < 0:
        raise UsageError("--lr-warmup must be 0 or more steps")
    if args.lr is not None and not args.lr > 0:
        raise UsageError("--lr must be a positive number")
    if args.node_rank is not None and not 0 <= args.node_rank < len(topology.nodes):
        raise UsageError(f"--node-rank {args.node_rank} is outside the topology's {len(topology.nodes)} nodes")
    if args.resume and not args.checkpoint_dir:
        raise UsageError("--resume needs --checkpoint-dir")
    # The backend default (nccl where there are GPUs) is settled in the worker, which imports torch anyway.
    return Config(args=args, topology=topology, hcof=hcof, ddp_hook=hook, critical=critical)


def resolve_backends(cfg: Config) -> None:
    import torch

    cuda = torch.cuda.is_available()
    if cfg.args.backend is None:
        cfg.args.backend = "nccl" if cuda else "gloo"
    cfg.args.inter_backend = cfg.args.inter_backend or cfg.args.backend
    if "nccl" in (cfg.args.backend, cfg.args.inter_backend) and not cuda:
        raise UsageError("--backend nccl needs CUDA GPUs; use --backend gloo on CPU")


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2
