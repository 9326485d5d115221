"""One training process: rendezvous, model, gradient exchange (HCOF or a DDP baseline), steps, metrics, checkpoints."""
from __future__ import annotations

import ctypes
import json
import math
import os
import signal
import statistics
import sys
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from . import checkpoint
from .catalog import DEFAULT_BATCH, DEFAULT_LR
from .cli import Config, UsageError, fail, resolve_backends
from .hcof.collectives import LevelExchanger
from .hcof.reducer import HcofReducer
from .hcof.topology import LEVELS, build_level_groups
from .models import build_task
from .projection import ddp_bytes_by_level


def _die_with_parent() -> None:
    # If the launcher is killed outright, its workers must not live on holding GPUs (Linux only).
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def emit(cfg: Config, record: dict) -> None:
    if cfg.json:
        print(json.dumps(record), flush=True)
    elif record.get("type") == "final":
        print(json.dumps(record, indent=2), flush=True)


def run_worker(cfg: Config) -> int:
    _die_with_parent()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    topo = cfg.topology
    try:
        resolve_backends(cfg)
    except UsageError as exc:
        return fail(str(exc))
    timeout = timedelta(seconds=cfg.pg_timeout)
    if cfg.backend == "nccl":
        count = torch.cuda.device_count()
        # A dispatcher that narrows CUDA_VISIBLE_DEVICES to this node's GPUs leaves them numbered from 0:
        # then the local rank is the index; an emulation on one host uses the topology's host indices.
        index = topo.place(rank).local_rank if count == topo.procs_per_node else topo.gpu_of(rank) % count
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // topo.procs_per_node))
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(cfg.backend, rank=rank, world_size=world, timeout=timeout, **kwargs)

    batch = cfg.batch_size or DEFAULT_BATCH[cfg.model]
    task = build_task(cfg.model, batch, cfg.seq_len, device, rank)
    model = task.model
    lr = cfg.lr or DEFAULT_LR[cfg.model]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0,
                                  **({"fused": True} if device.type == "cuda" else {}))

    reducer = None
    exchanger = None
    engine = ddp_engine(cfg)
    if engine:
        if world > 1:
            model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                        bucket_cap_mb=cfg.bucket_mb, gradient_as_bucket_view=True)
            _register_ddp_hook(model, cfg.ddp_hook)
    else:
        backends = {"intra_node": cfg.backend, "inter_node": cfg.inter_backend, "cross_rack": cfg.inter_backend}
        groups = build_level_groups(topo, rank, backends, timeout)
        for p in model.parameters():  # replicas start identical, as DDP makes them
            dist.broadcast(p.data, src=0)
        exchanger = LevelExchanger(groups, device)
        reducer = HcofReducer(task.model, exchanger, cfg.hcof, cfg.critical, world, device,
                              bucket_mb=cfg.bucket_mb, first_bucket_mb=cfg.first_bucket_mb,
                              codec_graphs=cfg.codec_graphs == "on")

    # With checkpoints, SIGTERM (a preemption, a cancel, a worker shutting down: the worker signals the
    # runner's whole process group) ends the attempt at a step boundary with a checkpoint, so that the
    # next attempt resumes from there. The ranks agree on the step by a one-number all-reduce each step;
    # without checkpoints (benchmarks) SIGTERM keeps its default and no collective is added.
    stop_requested = threading.Event() if cfg.checkpoint_dir else None
    if stop_requested is not None:
        signal.signal(signal.SIGTERM, lambda _signum, _frame: stop_requested.set())
        stop_flag = torch.zeros(1, dtype=torch.int32, device=device)

    start_step = 0
    if cfg.resume:
        start_step = checkpoint.load(cfg.checkpoint_dir, rank, task.model, optimizer, reducer)
        if start_step and rank == 0:  # one line, as for steps: ranks writing together interleave on stdout
            emit(cfg, {"type": "resumed", "step": start_step})

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _null()
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else min(5, cfg.steps // 5)
    global_batch = batch * world
    timed = {"step": 0.0, "compute": 0.0, "exposed": 0.0, "busy": 0.0, "n": 0}
    level_s = {lv: 0.0 for lv in LEVELS}
    level_bytes = {lv: 0 for lv in LEVELS}
    losses: list[float] = []
    step_times: list[float] = []  # the timed steps, for the median
    profiler = _profiler(cfg, rank, warmup)
    # On a GPU the step is timed with CUDA events so that it keeps one host sync (the loss), like DDP's.
    gpu_timing = device.type == "cuda"
    if gpu_timing:
        step_start, bwd_end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for step in range(start_step, cfg.steps):
        before_b = dict(exchanger.bytes) if exchanger else {}
        before_s = dict(exchanger.seconds) if exchanger else {}
        t0 = time.perf_counter()
        if gpu_timing:
            step_start.record()
        if reducer:
            reducer.start_step()
        with autocast:
            loss = task.loss(model, task.batch(step, rank, world))
        loss.backward()
        if reducer:
            if gpu_timing:
                bwd_end.record()  # read after the step's one host sync (loss.item() below)
            else:
                t_bwd = time.perf_counter()
            exposed = reducer.finish()
        if cfg.lr_warmup:
            for group in optimizer.param_groups:  # from the step number alone, so a resumed run is the same
                group["lr"] = warmup_lr(lr, step, cfg.lr_warmup)
        optimizer.step()
        if reducer:
            reducer.zero_grad()
        else:
            optimizer.zero_grad(set_to_none=False)
        loss_value = loss.item()  # also waits for the GPU, so the step time below is real
        t1 = time.perf_counter()
        if gpu_timing and reducer:
            t_bwd = t0 + step_start.elapsed_time(bwd_end) / 1000.0
            exposed, _ = reducer.timings()
        if not math.isfinite(loss_value):
            print(f"error: rank {rank} loss became {loss_value} at step {step}", file=sys.stderr)
            return 1
        losses.append(loss_value)
        record = {"type": "step", "step": step + 1, "steps": cfg.steps, "loss": round(loss_value, 6),
                  "step_s": round(t1 - t0, 6),
                  "samples_per_s": round(global_batch / (t1 - t0), 2), "lr": optimizer.param_groups[0]["lr"]}
        if reducer:
            record["compute_s"] = round(t_bwd - t0, 6)
            record["exposed_comm_s"] = round(exposed, 6)
            record["comm_s"] = {lv: round(exchanger.seconds[lv] - before_s[lv], 6) for lv in LEVELS}
            record["bytes"] = {lv: exchanger.bytes[lv] - before_b[lv] for lv in LEVELS}
        if profiler is not None:
            profiler.step()
        if step - start_step >= warmup:
            timed["n"] += 1
            timed["step"] += t1 - t0
            step_times.append(t1 - t0)
            if reducer:
                timed["compute"] += t_bwd - t0
                timed["exposed"] += exposed
                timed["busy"] += reducer.step_busy
                for lv in LEVELS:
                    level_s[lv] += record["comm_s"][lv]
                    level_bytes[lv] += record["bytes"][lv]
        if rank == 0:
            emit(cfg, record)
        saved = cfg.checkpoint_dir and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0
        if saved:
            checkpoint.save(cfg.checkpoint_dir, rank, step + 1, task.model, optimizer, reducer)
        if stop_requested is not None and step + 1 < cfg.steps:
            stop_flag.fill_(int(stop_requested.is_set()))
            dist.all_reduce(stop_flag, op=dist.ReduceOp.MAX)
            if stop_flag.item():
                if not saved:
                    checkpoint.save(cfg.checkpoint_dir, rank, step + 1, task.model, optimizer, reducer)
                if rank == 0:
                    emit(cfg, {"type": "stopped", "step": step + 1, "checkpoint": step + 1})
                dist.destroy_process_group()
                return 128 + signal.SIGTERM
    if cfg.checkpoint_dir and (not cfg.checkpoint_every or cfg.steps % cfg.checkpoint_every):
        checkpoint.save(cfg.checkpoint_dir, rank, cfg.steps, task.model, optimizer, reducer)
    if cfg.checkpoint_dir and rank == 0:
        checkpoint.export_weights(cfg.checkpoint_dir, cfg.steps, task.model, cfg.model)

    if profiler is not None:
        profiler.stop()
        _write_profile(profiler, cfg.profile_dir)
    timed["median"] = statistics.median(step_times) if step_times else 0.0
    timed["eval_loss"] = task.eval_loss(task.model, autocast) if rank == 0 else None  # rank 0 reports it
    timed["first_step"] = start_step + 1  # a resumed attempt's losses start after its checkpoint
    final = _final_record(cfg, task, rank, world, device, batch, timed, level_s, level_bytes, losses, reducer, lr,
                          engine)
    if rank == 0:
        emit(cfg, final)
    dist.barrier()
    dist.destroy_process_group()
    return 0


def warmup_lr(lr: float, step: int, warmup: int) -> float:
    """The learning rate of 0-based `step` under a linear warm-up over `warmup` steps."""
    return lr * min(1.0, (step + 1) / warmup) if warmup > 0 else lr


def ddp_engine(cfg: Config) -> bool:
    """Whether DDP's reducer runs the exchange: for the baselines, and for HCOF when the allocation spans a single
    level and nothing is compressed. Then HCOF's hierarchy has one step, a plain all-reduce, and DDP's C++
    reducer does exactly that with no Python on the backward path, where HCOF's own reducer would add a hook call
    per parameter and a communication thread (on a launch-bound step, host time is step time)."""
    if cfg.hcof is None:
        return True
    used = [lv for lv in LEVELS if cfg.topology.level_size(lv) > 1]
    same_backend = not used or used[0] == "intra_node" or cfg.inter_backend in (None, cfg.backend)
    return len(used) <= 1 and same_backend and all(cfg.hcof[lv].name == "none" for lv in (*used, "critical"))


def _register_ddp_hook(model: DDP, hook: str) -> None:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    if hook == "bf16":
        if dist.get_backend() == "nccl":
            model.register_comm_hook(None, default_hooks.bf16_compress_hook)
        else:  # torch refuses its own hook off NCCL; the same algorithm, for gloo runs on CPU
            model.register_comm_hook(None, _bf16_hook_gloo)
    elif hook.startswith("powersgd:"):
        # start_powerSGD_iter=2: compress from the second step (the default waits 1,000 steps).
        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=int(hook.split(":")[1]),
                                            start_powerSGD_iter=2, warm_start=True, use_error_feedback=True)
        model.register_comm_hook(state, powerSGD_hook.powerSGD_hook)


def _bf16_hook_gloo(process_group, bucket):
    group = process_group or dist.group.WORLD
    compressed = bucket.buffer().to(torch.bfloat16).div_(group.size())
    fut = dist.all_reduce(compressed, group=group, async_op=True).get_future()

    def decompress(f):
        out = bucket.buffer()
        out.copy_(f.value()[0])
        return out

    return fut.then(decompress)


def _profiler(cfg: Config, rank: int, warmup: int):
    """torch.profiler over a few steps after the warm-up, on rank 0 only (--profile-dir)."""
    if not cfg.profile_dir or rank != 0:
        return None
    from torch.profiler import ProfilerActivity, profile, schedule

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    prof = profile(activities=activities, schedule=schedule(wait=max(0, warmup - 1), warmup=1, active=cfg.profile_steps,
                                                                  repeat=1),
                   record_shapes=False, with_stack=False)
    prof.start()
    return prof


def _write_profile(prof, out_dir: str) -> None:
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(out / "trace.json"))
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    (out / "ops.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=60))


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _final_record(cfg, task, rank, world, device, batch, timed, level_s, level_bytes, losses, reducer, lr,
                  engine) -> dict:
    tail = losses[-min(10, len(losses)):] if losses else [float("nan")]
    mine = torch.tensor([sum(tail) / len(tail), losses[-1] if losses else float("nan"),
                         _checksum(task.model)], dtype=torch.float64, device=device)
    everyone = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine)
    stacked = torch.stack(everyone).cpu()
    stats = torch.tensor([timed["n"], timed["step"], timed["compute"], timed["exposed"], timed["busy"],
                          *[level_s[lv] for lv in LEVELS], *[level_bytes[lv] for lv in LEVELS], timed["median"]],
                         dtype=torch.float64, device=device)
    gathered = [torch.zeros_like(stats) for _ in range(world)]
    dist.all_gather(gathered, stats)
    g = torch.stack(gathered).cpu()
    n = max(1.0, float(g[0, 0]))
    mean_step_s = float(g[:, 1].max()) / n  # the slowest rank sets the pace
    # The median step (of the slowest rank) is what the comparisons use: a stray slow step (a collection, a
    # host hiccup) moves a 30-step mean by several percent, more than the differences being measured.
    step_s = float(g[:, 5 + 2 * len(LEVELS)].max())
    samples_per_s = batch * world / step_s if step_s > 0 else None
    sums = [abs(float(x)) for x in stacked[:, 2]]
    consistent = (max(sums) - min(sums)) <= 1e-6 * max(1.0, max(sums))
    record = {
        "type": "final", "model": cfg.model, "synthetic": task.synthetic, "task": task.description,
        "world_size": world, "topology": cfg.topology.describe(), "backend": cfg.backend,
        "inter_backend": cfg.inter_backend,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "mode": _mode_name(cfg),
        "engine": "ddp" if engine else "hcof",  # who ran the exchange: DDP's reducer or HCOF's own
        "batch_per_process": batch, "lr": lr, "lr_warmup": cfg.lr_warmup,
        "steps": cfg.steps, "timed_steps": int(n),
        "final_loss": round(float(stacked[:, 0].mean()), 6), "last_step_loss": round(float(stacked[:, 1].mean()), 6),
        "step_time_s": round(step_s, 6), "step_time_mean_s": round(mean_step_s, 6),
        "step_time_is": "median of the timed steps, slowest rank",
        "samples_per_s": round(samples_per_s, 2) if samples_per_s else None,
        "replicas_consistent": consistent,
        # Rank 0's training loss at (up to) 20 evenly spaced steps: how the run got to its final loss.
        "loss_curve": [[timed.get("first_step", 1) + i, round(losses[i], 4)]
                       for i in sorted({int(k * (len(losses) - 1) / 19) for k in range(20)})] if losses else [],
    }
    if task.evaluate is not None:
        record["final_accuracy"] = round(task.evaluate(), 6)
    if timed.get("eval_loss") is not None:
        record["eval_loss"] = round(timed["eval_loss"], 6)  # rank 0's replica (they are checked identical)
    if cfg.single_samples_per_s and samples_per_s:
        record["scaling_efficiency"] = round(samples_per_s / (world * cfg.single_samples_per_s), 4)
    if reducer is not None:
        busy = float(g[:, 4].mean()) / n
        exposed = float(g[:, 3].mean()) / n
        record.update({
            "compute_s": round(float(g[:, 2].mean()) / n, 6),
            "comm_s_by_level": {lv: round(float(g[:, 5 + i].mean()) / n, 6) for i, lv in enumerate(LEVELS)},
            "comm_busy_s": round(busy, 6), "exposed_comm_s": round(exposed, 6),
            "comm_share": round(exposed / mean_step_s, 4) if mean_step_s else None,
            "overlap_ratio": round(max(0.0, 1 - exposed / busy), 4) if busy > 0 else None,
            "bytes_by_level": {lv: int(g[:, 8 + i].sum()) for i, lv in enumerate(LEVELS)},
            "bytes_per_step_by_level": {lv: int(g[:, 8 + i].sum() / n) for i, lv in enumerate(LEVELS)},
            "bytes_counted": "measured: sizes of the tensors handed to each level's collectives, summed over ranks",
            "hcof": {k: v.name for k, v in cfg.hcof.items()}, "buckets": len(reducer.buckets),
        })
    elif world > 1:
        per_step = ddp_bytes_by_level(task.model, cfg.topology, cfg.ddp_hook)
        if cfg.hcof is not None:
            record["hcof"] = {k: v.name for k, v in cfg.hcof.items()}
        record.update({
            "bytes_per_step_by_level": per_step,
            "bytes_by_level": {lv: b * int(n) for lv, b in per_step.items()},
            "bytes_counted": "modelled: a flat ring all-reduce of DDP's buckets over ranks laid out node by node",
        })
    return record


def _mode_name(cfg: Config) -> str:
    if cfg.hcof is not None:
        return "hcof " + ",".join(f"{k}={v.name}" for k, v in cfg.hcof.items())
    return "ddp fp32" if cfg.ddp_hook == "none" else f"ddp {cfg.ddp_hook} hook"


def _checksum(model: torch.nn.Module) -> float:
    with torch.no_grad():
        return float(sum(p.double().sum() for p in model.parameters()))

