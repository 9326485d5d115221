"""Probes of the tenant-slowdown Jain index on a trace: what ordering could lift it (docs/scheduler.md,
"Why the Jain index stays low"). Not the product's policy: each probe changes only the WFQ order key.

  python bench/scheduler_fairness_probe.py MODE [PARAM] [--trace jobs.csv] [--nodes 80]

MODE
  base            the product's WFQ, as replay_trace runs it
  div P           feedback: each tenant's mean bounded slowdown over its *completed* jobs (known to a
                  live scheduler: submit, start and end of finished jobs) divides its order keys, ^P
  cls B           feedback as classes: tenants ordered by round(log_B(mean slowdown)), highest first
  oracle S        NOT realisable: knows every job's true run time; jobs shorter than S seconds go
                  first, shortest first (an upper bound on what run-time knowledge could do)
  oracle-est      NOT realisable: every job's estimate is its true run time (tags, backfill and
                  reservations all see it); the order is the product's

Prints one JSON line: mean / p99 wait, tenant_slowdown_jain, mean bounded slowdown, wall seconds.
Needs ../shared/data (the Philly trace) unless --trace names another file.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from heapq import heappop, heappush
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "deepopt_web.settings")

from apps.scheduling.policy.engine import Scheduler  # noqa: E402
from apps.scheduling.policy.estimator import RuntimeEstimator  # noqa: E402
from apps.scheduling.policy.types import PolicyConfig, QueuedJob, TeamSpec  # noqa: E402
from apps.scheduling.replay import SLOWDOWN_BOUND_S, load_trace, load_weights, metrics  # noqa: E402

TRACE = ROOT.parent / "shared/data/traces/philly-2017-sep-oct/jobs.csv"


class Probe(Scheduler):
    mode, param, jobs = "base", 1.0, ()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.slowdowns: dict = {}  # tenant -> (sum, count) over completed jobs

    def order_key(self, entry, now, levels):
        base = super().order_key(entry, now, levels)
        if base[0] == 0 or self.mode in ("base", "oracle-est"):
            return base
        if self.mode == "oracle":
            run = self.jobs[entry.id].duration
            return (1, (run if run < self.param else 1e12) + base[1] * 1e-6, base[2])
        total, count = self.slowdowns.get(entry.team, (0.0, 0))
        mean = total / count if count else 1.0
        if self.mode == "div":
            return (1, base[1] / mean ** self.param, base[2])
        return (1, -round(math.log(mean, self.param)) * 1e13 + base[1], base[2])  # cls


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=("base", "div", "cls", "oracle", "oracle-est"))
    p.add_argument("param", nargs="?", type=float, default=1.0)
    p.add_argument("--trace", default=str(TRACE))
    p.add_argument("--nodes", type=int, default=80)
    p.add_argument("--gpus-per-node", type=int, default=8)
    a = p.parse_args()
    if not Path(a.trace).exists():
        print(f"error: no trace at {a.trace} (../shared/data is missing; pass --trace)", file=sys.stderr)
        return 2
    jobs = load_trace(a.trace)
    weights_file = Path(a.trace).with_name("weights.csv")
    weights = load_weights(weights_file) if weights_file.exists() else {}
    config = PolicyConfig(policy="wfq")
    estimator = RuntimeEstimator(config)
    Probe.mode, Probe.param, Probe.jobs = a.mode, a.param, jobs
    sched = Probe(config, estimator, now=jobs[0].submit)
    g = a.gpus_per_node
    for n in range(a.nodes):
        sched.cluster.add_node(n, f"node-{n}", "rack-0", True, ((n * g + i, i, 81920) for i in range(g)))
    for tenant, weight in weights.items():
        sched.add_team(TeamSpec(id=tenant, name=tenant, weight=weight))
    began = time.perf_counter()
    starts = [math.nan] * len(jobs)
    ends: list = []
    i = 0
    while i < len(jobs) or ends:
        now = jobs[i].submit if i < len(jobs) else math.inf
        if ends and ends[0][0] <= now:
            now = ends[0][0]
        while ends and ends[0][0] <= now:
            _, k = heappop(ends)
            job = jobs[k]
            sched.finish(k, now)
            estimator.observe(job.tenant, job.kind, job.gpus, job.duration)
            slowdown = max(1.0, (starts[k] - job.submit + job.duration) / max(job.duration, SLOWDOWN_BOUND_S))
            total, count = sched.slowdowns.get(job.tenant, (0.0, 0))
            sched.slowdowns[job.tenant] = (total + slowdown, count + 1)
        while i < len(jobs) and jobs[i].submit <= now:
            job = jobs[i]
            sched.enqueue(QueuedJob(id=i, team=job.tenant, kind=job.kind, gpus=job.gpus, submit=job.submit,
                                    priority=job.priority, nodes=-(-job.gpus // g),
                                    estimated_runtime_s=max(1.0, job.duration) if a.mode == "oracle-est" else None))
            i += 1
        for k in sched.schedule_pass(now).placements:
            starts[k] = now
            heappush(ends, (now + jobs[k].duration, k))
    m = metrics(jobs, starts, a.nodes * g)
    print(json.dumps({"mode": a.mode, "param": a.param, "nodes": a.nodes,
                      **{k: m[k] for k in ("mean_wait_s", "p99_wait_s", "tenant_slowdown_jain",
                                           "mean_bounded_slowdown")},
                      "wall_s": round(time.perf_counter() - began, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
