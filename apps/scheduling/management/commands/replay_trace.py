"""`manage.py replay_trace TRACE.csv --policy wfq|fifo|firstfit --nodes N --gpus-per-node G [--racks R]
[--weights W.csv] [--no-preemption] [--restart-s S] --json`: the policy core on a virtual clock over a job
trace."""
from __future__ import annotations

import json
from dataclasses import fields, replace

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from apps.scheduling.policy import PolicyConfig
from apps.scheduling.policy.types import POLICIES
from apps.scheduling.replay import RESTART_S, TraceError, replay


def configured_policy(policy: str) -> PolicyConfig:
    """The live scheduler's knobs (settings.DEEPOPT_SCHEDULER, PolicyConfig field names), with `policy`,
    so that a replay measures the policy the cluster runs."""
    known = {f.name for f in fields(PolicyConfig)}
    overrides = {k: v for k, v in getattr(settings, "DEEPOPT_SCHEDULER", {}).items() if k in known}
    overrides["policy"] = policy
    return PolicyConfig(**overrides)


class Command(BaseCommand):
    help = "Replay a job trace (submit_s,duration_s,num_gpus,tenant[,priority,kind]) through the scheduler."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("trace", help="CSV: submit_s,duration_s,num_gpus,tenant (optional priority,kind)")
        parser.add_argument("--policy", choices=POLICIES, default="wfq",
                            help="wfq (DeepOpt), fifo (strict arrival order), firstfit (arrival order, greedy)")
        parser.add_argument("--nodes", type=int, required=True)
        parser.add_argument("--gpus-per-node", type=int, required=True)
        parser.add_argument("--racks", type=int, default=1, help="nodes are split evenly over this many racks")
        parser.add_argument("--weights", help="CSV with columns tenant,weight; missing tenants weigh 1")
        parser.add_argument("--no-preemption", action="store_true",
                            help="wfq without preemption (running jobs are never stopped)")
        parser.add_argument("--restart-s", type=float, default=RESTART_S,
                            help="what a preempted job pays when it resumes (default %(default)s s)")
        parser.add_argument("--json", action="store_true", help="print one JSON object")

    def handle(self, *args, **options) -> None:
        config = configured_policy(options["policy"])
        if options["no_preemption"]:
            config = replace(config, preemption=False)
        try:
            result = replay(
                options["trace"], options["policy"], options["nodes"], options["gpus_per_node"],
                racks=options["racks"], weights=options["weights"], config=config, restart_s=options["restart_s"],
            )
        except TraceError as exc:
            raise CommandError(str(exc), returncode=2) from None
        if result["rejected_jobs"]:
            rows = result["rejected"]["rows"]
            more = ", ..." if result["rejected_jobs"] > len(rows) else ""
            self.stderr.write(f"warning: {result['rejected_jobs']} job(s) rejected, left out of the replay and its "
                              f"numbers: {result['rejected']['reason']} (rows {', '.join(map(str, rows))}{more})")
        if options["json"]:
            self.stdout.write(json.dumps(result))
            return
        self.stdout.write(
            f"{result['jobs']} jobs, policy {options['policy']} on "
            f"{options['nodes']} x {options['gpus_per_node']} GPUs\n"
            f"wait: mean {result['mean_wait_s']:.0f} s, p50 {result['p50_wait_s']:.0f} s, "
            f"p95 {result['p95_wait_s']:.0f} s, p99 {result['p99_wait_s']:.0f} s\n"
            f"mean JCT {result['mean_jct_s']:.0f} s, mean bounded slowdown {result['mean_bounded_slowdown']:.2f}, "
            f"makespan {result['makespan_s']:.0f} s, utilization {result['utilization']:.1%}, "
            f"tenant slowdown Jain {result['tenant_slowdown_jain']:.3f}, "
            f"{result['preemptions']} preemptions of {result['preempted_jobs']} jobs\n"
            f"replayed in {result['wall_s']:.1f} s"
        )
