"""A study, not the product: would preemption (least attained service first) reach the fairness goal?

The product's scheduler never stops a running job. Tiresias-style schedulers do: a job that has run
less (GPU-seconds) than a threshold goes before every job that has run more, and may preempt one to
start; the preempted job goes back to the queue, keeps what it has done (checkpoints) and pays a
restart cost when it resumes. On Philly the fairness index is made by short whole-node jobs stuck
behind long ones, which is what this targets.

This is a separate, simplified simulator (same trace, same cluster shape, best-fit single-node
placement, multi-node jobs on whole free nodes, no quotas, no reservations, no weights) run three
ways: FIFO without preemption (to compare with the replay's FIFO), greedy without preemption, and
two-class LAS with preemption. It prints, for each, the replay's mean and p99 wait, mean bounded
slowdown and tenant-slowdown Jain (wait = time not running: queued, and restarting after a
preemption), each tenant's mean bounded slowdown, and the number of preemptions.

    python bench/scheduler_preemption_probe.py --nodes 64,72,80,90,100 [--threshold-gpu-s 14400] \
        [--restart-s 300] --out bench/results/scheduler-preemption-probe-DATE.json
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from apps.scheduling.replay import _jain, _percentile, load_trace  # noqa: E402

TRACE = ROOT.parent / "shared" / "data" / "traces" / "philly-2017-sep-oct" / "jobs.csv"
GPN = 8


class Cluster:
    def __init__(self, nodes: int):
        self.free = [GPN] * nodes
        self.on: list[dict[int, int]] = [{} for _ in range(nodes)]  # node -> {job: gpus}

    def place(self, gpus: int) -> list[tuple[int, int]] | None:
        if gpus <= GPN:
            best = None
            for n, f in enumerate(self.free):
                if f >= gpus and (best is None or f < self.free[best]):
                    best = n
                    if f == gpus:
                        break
            return None if best is None else [(best, gpus)]
        need = math.ceil(gpus / GPN)
        whole = [n for n, f in enumerate(self.free) if f == GPN][:need]
        return [(n, GPN) for n in whole] if len(whole) == need else None

    def hold(self, job: int, where: list[tuple[int, int]]) -> None:
        for n, g in where:
            self.free[n] -= g
            self.on[n][job] = g

    def release(self, job: int, where: list[tuple[int, int]]) -> None:
        for n, g in where:
            self.free[n] += g
            del self.on[n][job]


class Sim:
    """modes: fifo (strict arrival order), greedy (any waiting job that fits, in arrival order),
    las (waiting jobs that have run less than `threshold` GPU-seconds first, and they may preempt
    jobs that have run more)."""

    def __init__(self, jobs, nodes: int, mode: str, threshold: float, restart: float):
        self.jobs, self.mode, self.threshold, self.restart = jobs, mode, threshold, restart
        self.cluster = Cluster(nodes)
        n = len(jobs)
        self.remaining = [j.duration for j in jobs]
        self.attained = [0.0] * n  # GPU-seconds run so far
        self.started_at = [0.0] * n
        self.where: dict[int, list[tuple[int, int]]] = {}
        self.version = [0] * n  # a preempted run's end event is stale
        self.done_at = [math.nan] * n
        self.queues: list[list[tuple[float, int]]] = [[], []]  # (submit, job) by class, in arrival order
        self.ends: list[tuple[float, int, int]] = []
        self.preemptions = 0

    def cls(self, k: int, now: float) -> int:
        run = self.attained[k]
        if k in self.where:
            run += (now - self.started_at[k]) * self.jobs[k].gpus
        return 0 if self.mode == "las" and run < self.threshold else 1

    def enqueue(self, k: int, now: float) -> None:
        bisect.insort(self.queues[self.cls(k, now)], (self.jobs[k].submit, k))

    def start(self, k: int, spot, now: float) -> None:
        self.cluster.hold(k, spot)
        self.where[k] = spot
        self.started_at[k] = now
        heapq.heappush(self.ends, (now + self.remaining[k], k, self.version[k]))

    def preempt(self, k: int, now: float) -> None:
        ran = now - self.started_at[k]
        self.attained[k] += ran * self.jobs[k].gpus
        self.remaining[k] = max(0.0, self.remaining[k] - ran) + self.restart
        self.cluster.release(k, self.where.pop(k))
        self.version[k] += 1
        self.preemptions += 1
        self.enqueue(k, now)

    def make_room(self, k: int, now: float):
        """Preempt the fewest GPUs of jobs past the threshold so that job k fits; its spot or None."""
        gpus, cluster = self.jobs[k].gpus, self.cluster
        if gpus <= GPN:
            best = None
            for n, free in enumerate(cluster.free):
                victims = sorted(
                    (j for j in cluster.on[n] if self.cls(j, now) == 1),
                    key=lambda j: -self.attained[j] - (now - self.started_at[j]) * self.jobs[j].gpus,
                )
                chosen, got = [], free
                for j in victims:
                    if got >= gpus:
                        break
                    chosen.append(j)
                    got += cluster.on[n][j]
                if got >= gpus and (best is None or got - free < best[0]):
                    best = (got - free, chosen)
            if best is None:
                return None
            for j in best[1]:
                self.preempt(j, now)
            return cluster.place(gpus)
        need = math.ceil(gpus / GPN)
        costs = []
        for n in range(len(cluster.free)):
            running = list(cluster.on[n])
            if all(self.cls(j, now) == 1 for j in running):
                costs.append((sum(self.jobs[j].gpus for j in running), n))
        if len(costs) < need:
            return None
        for _, n in sorted(costs)[:need]:
            for j in list(cluster.on[n]):
                if j in self.where:
                    self.preempt(j, now)
        return cluster.place(gpus)

    def schedule(self, now: float) -> None:
        cluster = self.cluster
        for c, queue in enumerate(self.queues):
            kept = []
            for pos, (sub, k) in enumerate(queue):
                gpus = self.jobs[k].gpus
                free_nodes = sum(1 for f in cluster.free if f == GPN)
                fits = gpus <= max(cluster.free) if gpus <= GPN else math.ceil(gpus / GPN) <= free_nodes
                spot = cluster.place(gpus) if fits else None
                if spot is None and c == 0 and self.mode == "las":
                    spot = self.make_room(k, now)
                if spot is not None:
                    self.start(k, spot, now)
                    continue
                kept.append((sub, k))
                stuck = sum(cluster.free) == 0 and (
                    c == 1 or not any(self.cls(j, now) == 1 for j in self.where)
                )
                if self.mode == "fifo" or stuck:
                    kept.extend(queue[pos + 1 :])
                    break
            # Preempted jobs (class 1) were queued into queues[1] while class 0 was scanned.
            self.queues[c] = kept
            if self.mode == "fifo" and kept:
                return

    def run(self) -> dict:
        jobs, n, i = self.jobs, len(self.jobs), 0
        while i < n or self.ends:
            nxt = jobs[i].submit if i < n else math.inf
            now = self.ends[0][0] if self.ends and self.ends[0][0] <= nxt else nxt
            while self.ends and self.ends[0][0] <= now:
                t, k, v = heapq.heappop(self.ends)
                if v == self.version[k] and k in self.where:
                    self.cluster.release(k, self.where.pop(k))
                    self.done_at[k] = t
            while i < n and jobs[i].submit <= now:
                self.enqueue(i, now)
                i += 1
            self.schedule(now)
        return metrics(jobs, self.done_at, self.preemptions)


def metrics(jobs, done_at, preemptions) -> dict:
    waits, slow, tenants = [], [], {}
    for j, d in zip(jobs, done_at, strict=True):
        w = max(0.0, d - j.submit - j.duration)
        waits.append(w)
        s = max(1.0, (w + j.duration) / max(j.duration, 60.0))
        slow.append(s)
        tenants.setdefault(j.tenant, []).append(s)
    ws = sorted(waits)
    per = [sum(v) / len(v) for v in tenants.values() if len(v) >= 10]
    return {
        "jobs": len(jobs),
        "mean_wait_s": round(sum(waits) / len(waits), 1),
        "p99_wait_s": round(_percentile(ws, 99), 1),
        "per_tenant_slowdown": {t: round(sum(v) / len(v), 2) for t, v in tenants.items() if len(v) >= 10},
        "mean_bounded_slowdown": round(sum(slow) / len(slow), 2),
        "tenant_slowdown_jain": round(_jain(per), 4),
        "preemptions": preemptions,
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--trace", type=Path, default=TRACE)
    p.add_argument("--nodes", default="80", help="comma-separated cluster sizes (nodes of 8 GPUs)")
    p.add_argument("--modes", default="fifo,greedy,las")
    p.add_argument("--threshold-gpu-s", type=float, default=14400.0)
    p.add_argument("--restart-s", type=float, default=300.0)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if not args.trace.is_file():
        print(f"no trace at {args.trace} (../shared/data is not beside this checkout)", file=sys.stderr)
        return 2
    jobs = load_trace(args.trace)
    out = {
        "study": "preemptive two-class LAS in a simplified simulator (not the product's scheduler)",
        "trace": str(args.trace),
        "threshold_gpu_s": args.threshold_gpu_s,
        "restart_s": args.restart_s,
        "results": {},
    }
    for nodes in (int(x) for x in args.nodes.split(",")):
        for mode in args.modes.split(","):
            t = time.perf_counter()
            result = Sim(jobs, nodes, mode, args.threshold_gpu_s, args.restart_s).run()
            out["results"].setdefault(str(nodes), {})[mode] = {**result, "wall_s": round(time.perf_counter() - t, 1)}
            print(nodes, mode, {k: result[k] for k in ("mean_wait_s", "p99_wait_s", "tenant_slowdown_jain")},
                  file=sys.stderr)
            if args.out:
                args.out.write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
