"""What each change in DeepOpt publishes to the live pages, and to whom (events.py sends it).

Scoping: a job's state goes to its team's group, its progress and log to its own group (sockets join
it only after a visibility check), a node's state and telemetry to its team's group, and the cluster
group hears aggregates only (counts of jobs and GPUs), never a team's job or node. Every team or job
event also reaches staff (events.publish adds STAFF).

Costs, since these run on hot paths: a submission or a state change publishes from the objects it
already holds (no query; a job end adds the team's usage, three queries); a heartbeat publishes
what the agent sent (no query); a scheduling pass builds its messages from its own snapshot and
decision (one query, for the teams of nodes that got jobs) and sends only the teams whose queue changed.
"""
from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from apps.scheduling.states import LIVE, TERMINAL

from .events import CLUSTER, job_group, publish, team_group, user_group

QUEUE_ENTRIES_PER_TEAM = 100  # the queue page shows 50 a page; a team's message carries its first 100
LOG_LINES_PER_EVENT = 50
LOG_LINE_CHARS = 300


def _cached(obj, field: str):  # noqa: ANN001, ANN202
    """A related object only if it is already loaded: a publisher must not add a query per event."""
    try:
        return obj._state.fields_cache.get(field)
    except AttributeError:
        return None


def job_state_data(job, event=None) -> dict:  # noqa: ANN001
    """Enough to add the job as a new row to the job list or the queue, or to update its row."""
    data = {
        "id": job.pk, "team": job.team_id, "name": job.name, "kind": job.kind, "state": job.state,
        "from_state": getattr(event, "from_state", "") or "", "priority": job.priority, "gpus": job.gpus,
        "nodes": job.nodes, "attempt": job.attempt, "submitted_at": job.submitted_at,
        "pending_reason": job.pending_reason, "model": (job.spec or {}).get("model", ""),
        "message": (getattr(event, "message", "") or "")[:500],
    }
    team = _cached(job, "team")
    if team is not None:
        data["team_name"] = team.name
    submitter = _cached(job, "submitter")
    if submitter is not None:
        data["submitter"] = submitter.get_username()
    return data


def on_job_changed(sender, job=None, event=None, **kwargs) -> None:  # noqa: ANN001
    """`scheduling.signals.job_changed` (after commit). Progress has its own event (job_progress)."""
    if job is None or (event is not None and getattr(event, "kind", "state") != "state"):
        return
    data = job_state_data(job, event)
    from_state = data["from_state"]
    if from_state in LIVE and job.state not in LIVE:
        # The job gave its GPUs back: its team's usage and its nodes' GPUs changed.
        data["usage"] = team_usage_data(job.team_id)
        _publish_released_nodes(job.pk)
    elif from_state == "queued" and job.state in TERMINAL:
        # Cancelled (or failed) while queued: no pass will speak of the job again, so its team's counts go now.
        data["usage"] = team_usage_data(job.team_id)
    elif from_state == "" and job.state == "queued":
        # A new job: only the team's queued count moved (one indexed count, not the month's GPU-hours), so the
        # pages' counts are right before the pass that follows the submission, or when none does.
        from apps.scheduling.models import Job

        data["usage"] = {"queued_jobs": Job.objects.filter(team_id=job.team_id, state="queued").count()}
    publish([team_group(job.team_id)], "job.state", data)


def team_usage_data(team_id: int) -> dict:
    from apps.scheduling.usage import team_usage

    usage = team_usage([_TeamRef(team_id)])[team_id]
    return {"gpus_in_use": usage.gpus_in_use, "gpu_hours_this_month": usage.gpu_hours_this_month,
            "queued_jobs": usage.queued_jobs, "running_jobs": usage.running_jobs}


class _TeamRef:
    """team_usage() reads only the teams' primary keys."""

    def __init__(self, pk: int) -> None:
        self.pk = pk


def _publish_released_nodes(job_id: int) -> None:
    from apps.cluster.models import GpuNode
    from apps.scheduling.models import Allocation

    node_ids = set(Allocation.objects.filter(job_id=job_id).values_list("node_id", flat=True))
    for node in GpuNode.objects.filter(pk__in=node_ids):
        node_state(node)


def node_state(node, *, busy: Iterable[int] | None = None, gpus: int | None = None) -> None:  # noqa: ANN001
    """A node's state and which of its GPUs are busy (queried unless the caller knows)."""
    if busy is None or gpus is None:
        from apps.cluster.models import Gpu
        from apps.scheduling.models import Allocation

        busy = Allocation.objects.filter(node_id=node.pk, released_at__isnull=True).values_list("gpu__index", flat=True)
        gpus = Gpu.objects.filter(node_id=node.pk).count()
    publish([team_group(node.team_id)], "node.state", {
        "id": node.pk, "name": node.name, "team": node.team_id, "state": node.state, "rack": node.rack,
        "busy": sorted(busy), "gpus": gpus,
    })


def on_node_changed(sender, node=None, **kwargs) -> None:  # noqa: ANN001
    """`cluster.signals.node_changed` (after commit): registered, drained, activated, down."""
    if node is not None:
        node_state(node)
        # Everyone's cluster chart draws the active capacity (a number it already shows to all): keep it true.
        from apps.cluster.services import active_gpus

        publish([CLUSTER], "cluster.capacity", {"active_gpus": active_gpus()})


def job_progress(job, attempt: int, lines: list[dict], *, rank: int = 0) -> None:  # noqa: ANN001
    """A batch of a runner's progress lines (apps/scheduling/reports.progress), to the job's group only."""
    from apps.scheduling.reports import summarize

    if not lines:
        return
    latest: dict = {}
    metrics: dict = {}
    for line in lines:
        for key in ("stage", "step", "steps", "pct", "epoch", "epochs"):
            if key in line:
                latest[key] = line[key]
        metrics.update({k: v for k, v in line.items() if _is_number(v) and k not in (
            "step", "steps", "pct", "epoch", "epochs", "seq", "rank", "pid")})
    percent = latest.get("pct")
    if not _is_number(percent) and _is_number(latest.get("step")) and _is_number(latest.get("steps")) \
            and latest["steps"] > 0:
        percent = 100.0 * latest["step"] / latest["steps"]
    publish([job_group(job.pk)], "job.progress", {
        "job": job.pk, "team": job.team_id, "attempt": attempt, "rank": rank, "state": job.state,
        "percent": round(float(percent), 2) if _is_number(percent) else None,
        "step": latest.get("step"), "steps": latest.get("steps"), "stage": latest.get("stage"),
        "metrics": dict(list(metrics.items())[:20]),
        "lines": [summarize(line)[:LOG_LINE_CHARS] for line in lines[-LOG_LINES_PER_EVENT:]],
    })


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


GPU_FIELDS = ("utilization", "memory_used_mb", "memory_total_mb", "temperature_c", "power_w")
HOST_FIELDS = ("cpu_percent", "memory_used_mb", "memory_total_mb")


def node_telemetry(node, *, host: dict | None, gpus: list[dict], ts: datetime) -> None:  # noqa: ANN001
    """One heartbeat's readings (apps/cluster/agent.record_heartbeat), to the node's team. No query."""
    publish([team_group(node.team_id)], "node.telemetry", {
        "node": node.pk, "team": node.team_id, "ts": ts,
        "gpus": [{"index": g.get("index"), **{k: g.get(k) for k in GPU_FIELDS}} for g in gpus],
        "host": {k: host.get(k) for k in HOST_FIELDS} if host else None,
    })


def queue_changed(snapshot, decision, etas: dict, placed: list, changed_jobs: Iterable | None = None,  # noqa: ANN001
                  *, etas_only: bool = False, held: dict | None = None) -> None:
    """After a scheduling pass (apps/scheduling/live.run_pass), from its snapshot and decision only.

    Each team whose queue changed (a job entered, left or moved, its reason or ETA changed) or that
    got GPUs gets its first QUEUE_ENTRIES_PER_TEAM queued jobs (position, reason, ETA) and its usage;
    nodes that got allocations get their busy GPUs; the cluster group gets the totals.
    `changed_jobs`: ids whose queue entry was written (None: every queued job). `etas_only`: the pass's
    ETAs were written afterwards (live.run_pass): only the teams of those jobs hear it, nodes and the
    cluster totals were sent with the pass. `held`: the jobs the pass kept out of the snapshot until the
    jobs they depend on succeed, job id -> (team id, position, reason, code); listed after the others.
    """
    held = held or {}
    placed_set = set(placed)
    team_of = {q.id: q.team for q in snapshot.queued}
    gpus_of = {q.id: q.gpus for q in snapshot.queued}
    changed = set(decision.pending) if changed_jobs is None else set(changed_jobs)
    dirty: set = {team_of[j] for j in changed | placed_set if j in team_of}
    dirty |= {held[j][0] for j in changed if j in held}
    if not etas_only:
        dirty |= {team_of[j] for j in team_of if j not in decision.pending and j not in placed_set}  # left the queue

    entries: dict = {}
    queued_count: dict = {}
    for job_id, pending in decision.pending.items():  # in queue order
        team = team_of.get(job_id)
        queued_count[team] = queued_count.get(team, 0) + 1
        if team in dirty and len(entries.setdefault(team, [])) < QUEUE_ENTRIES_PER_TEAM:
            eta = etas.get(job_id)
            entries[team].append({"job": job_id, "position": pending.position, "reason": pending.reason[:300],
                                  "code": pending.code, "eta": datetime.fromtimestamp(eta, tz=UTC) if eta
                                  else None})
    for job_id, (team, position, reason, code) in sorted(held.items(), key=lambda item: item[1][1]):
        queued_count[team] = queued_count.get(team, 0) + 1
        if team in dirty and len(entries.setdefault(team, [])) < QUEUE_ENTRIES_PER_TEAM:
            entries[team].append({"job": job_id, "position": position, "reason": reason, "code": code, "eta": None})
    running_jobs: dict = {}
    gpus_in_use: dict = {}
    for job in snapshot.running:
        running_jobs[job.team] = running_jobs.get(job.team, 0) + 1
        gpus_in_use[job.team] = gpus_in_use.get(job.team, 0) + job.gpu_count
    for job_id in placed_set:
        team = team_of.get(job_id)
        running_jobs[team] = running_jobs.get(team, 0) + 1
        gpus_in_use[team] = gpus_in_use.get(team, 0) + gpus_of.get(job_id, 0)
    hours = {t.id: t.gpu_seconds_used_this_month / 3600 for t in snapshot.teams}
    for team in dirty:
        publish([team_group(team)], "queue.changed", {
            "scope": "team", "team": team, "queued": queued_count.get(team, 0),
            "entries": entries.get(team, []),
            "truncated": queued_count.get(team, 0) > len(entries.get(team, [])),
            "usage": {"gpus_in_use": gpus_in_use.get(team, 0), "gpu_hours_this_month": round(hours.get(team, 0.0), 2),
                      "queued_jobs": queued_count.get(team, 0), "running_jobs": running_jobs.get(team, 0)},
        })
    if etas_only:
        return
    _publish_placed_nodes(snapshot, decision, placed_set)
    if dirty:
        total_gpus = sum(len(n.gpus) for n in snapshot.nodes)
        busy = sum(len(n.gpus) - len(n.free_gpu_ids) for n in snapshot.nodes) + sum(
            gpus_of.get(j, 0) for j in placed_set)
        publish([CLUSTER], "queue.changed", {
            "scope": "cluster", "queued": len(decision.pending) + len(held), "placed": len(placed_set),
            "running": len(snapshot.running) + len(placed_set), "gpus_total": total_gpus, "gpus_busy": busy,
        })


def _publish_placed_nodes(snapshot, decision, placed: set) -> None:  # noqa: ANN001
    taken: dict = {}
    for job_id in placed:
        for node_id, gpu_ids in decision.placements.get(job_id, ()):
            taken.setdefault(node_id, set()).update(gpu_ids)
    if not taken:
        return
    from apps.cluster.models import GpuNode

    teams = dict(GpuNode.objects.filter(pk__in=list(taken)).values_list("pk", "team_id"))
    for node in snapshot.nodes:
        if node.id not in taken or node.id not in teams:
            continue
        free = node.free_gpu_ids - taken[node.id]
        busy = [g.index for g in node.gpus if g.gpu_id not in free]
        publish([team_group(teams[node.id])], "node.state", {
            "id": node.id, "name": node.name, "team": teams[node.id], "state": node.state, "rack": node.rack,
            "busy": sorted(busy), "gpus": len(node.gpus),
        })


MEMBERSHIP_CHANGED = "membership.changed"


def on_membership_changed(sender, instance=None, **kwargs) -> None:  # noqa: ANN001
    """A user joined or left a team (Membership saved or deleted): their open sockets re-read their groups
    (consumers.EventsConsumer.refresh_groups), so a removed member stops hearing the team at once."""
    if instance is not None and instance.user_id:
        publish([user_group(instance.user_id)], MEMBERSHIP_CHANGED, {})


def on_user_saved(sender, instance=None, created=False, update_fields=None, **kwargs) -> None:  # noqa: ANN001
    """A user made staff or not, or deactivated: the same re-read (a login only touches last_login)."""
    if instance is None or created or (update_fields is not None and set(update_fields) <= {"last_login"}):
        return
    publish([user_group(instance.pk)], MEMBERSHIP_CHANGED, {})
