"""Probes of the tenant-slowdown Jain index on a trace: what ordering could lift it (docs/scheduler.md,
"Why the Jain index stays low"). Not the product's policy: each probe changes only the WFQ order key.

  python bench/scheduler_fairness_probe.py MODE [PARAM] [--trace jobs.csv] [--nodes 80]

MODE
  base            the product's WFQ, as replay_trace runs it
  div P           feedback: each tenant's mean bounded slowdown over its *completed* jobs (known to a
                  live scheduler: submit, start and end of finished jobs) divides its order keys, ^P
  divd H          as div 1, with a mean that decays with a half-life of H hours
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
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "deepopt_web.settings")

from apps.scheduling.policy.engine import Scheduler  # noqa: E402
from apps.scheduling.policy.types import PolicyConfig, QueuedJob  # noqa: E402
from apps.scheduling.replay import SLOWDOWN_BOUND_S, load_trace, load_weights, metrics, run_trace  # noqa: E402

TRACE = ROOT.parent / "shared/data/traces/philly-2017-sep-oct/jobs.csv"


class Probe(Scheduler):
    """The product's Scheduler with one changed order key, and the slowdown of every job that ended."""

    mode, param, jobs = "base", 1.0, ()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.started: dict = {}  # job -> (tenant, submit, start)
        self.slowdowns: dict = {}  # tenant -> (sum, count) over completed jobs

    def enqueue(self, job: QueuedJob):
        if self.mode == "oracle-est":
            job = replace(job, estimated_runtime_s=max(1.0, self.jobs[job.id].duration))
        return super().enqueue(job)

    def _start(self, entry, where, now, decision) -> None:
        self.started[entry.id] = (entry.team, entry.submit, now, entry.job.ran_s)
        super()._start(entry, where, now, decision)

    def finish(self, job_id, now: float) -> None:
        # What a live scheduler knows of a job that ended: its submit, its end and what it ran in all.
        team, submit, start, ran_before = self.started.pop(job_id)
        run = ran_before + now - start
        slowdown = max(1.0, (now - submit) / max(run, SLOWDOWN_BOUND_S))
        total, count, last = self.slowdowns.get(team, (0.0, 0.0, now))
        if self.mode == "divd":  # a decayed mean: param is the half-life in hours
            decay = 0.5 ** ((now - last) / (self.param * 3600.0))
            total, count = total * decay, count * decay
        self.slowdowns[team] = (total + slowdown, count + 1, now)
        super().finish(job_id, now)

    def order_key(self, entry, now, levels):
        base = super().order_key(entry, now, levels)
        if base[0] != 1 or self.mode in ("base", "oracle-est"):  # the fresh jobs' WFQ order only
            return base
        if self.mode == "oracle":
            run = self.jobs[entry.id].duration
            return (1, (run if run < self.param else 1e12) + base[1] * 1e-6, base[2])
        total, count, _ = self.slowdowns.get(entry.team, (0.0, 0.0, 0.0))
        mean = total / count if count else 1.0
        if self.mode == "divd":
            return (base[0], base[1] / mean, base[2])
        if self.mode == "div":
            return (base[0], base[1] / mean ** self.param, base[2])
        return (base[0], -round(math.log(mean, self.param)) * 1e13 + base[1], base[2])  # cls


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=("base", "div", "divd", "cls", "oracle", "oracle-est"))
    p.add_argument("param", nargs="?", type=float, default=1.0)
    p.add_argument("--trace", default=str(TRACE))
    p.add_argument("--nodes", type=int, default=80)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--no-preemption", action="store_true")
    p.add_argument("--tenants", action="store_true", help="also per tenant: jobs, mean wait, mean bounded slowdown")
    a = p.parse_args()
    if not Path(a.trace).exists():
        print(f"error: no trace at {a.trace} (../shared/data is missing; pass --trace)", file=sys.stderr)
        return 2
    jobs = load_trace(a.trace)
    weights_file = Path(a.trace).with_name("weights.csv")
    weights = load_weights(weights_file) if weights_file.exists() else {}
    Probe.mode, Probe.param, Probe.jobs = a.mode, a.param, jobs
    began = time.perf_counter()
    out = run_trace(jobs, PolicyConfig(policy="wfq", preemption=not a.no_preemption), a.nodes, a.gpus_per_node, 1,
                    weights, scheduler_class=Probe)
    m = metrics(jobs, out.starts, a.nodes * a.gpus_per_node, out.ends)
    print(json.dumps({"mode": a.mode, "param": a.param, "nodes": a.nodes,
                      **{k: m[k] for k in ("mean_wait_s", "p99_wait_s", "tenant_slowdown_jain",
                                           "mean_bounded_slowdown")},
                      "wall_s": round(time.perf_counter() - began, 1),
                      **({"per_tenant": {t: [v["jobs"], round(v["mean_wait_s"]), round(v["mean_bounded_slowdown"], 2)]
                                         for t, v in m["per_tenant"].items()}} if a.tenants else {})}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
