"""The live scheduler: feed the pure policy core from the database, apply its decision in one transaction.

One pass at a time cluster-wide: on PostgreSQL a transaction-scoped advisory lock; on SQLite the
transaction itself is `BEGIN IMMEDIATE` (settings), which already admits one writer at a time.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Q
from django.utils import timezone

from apps.accounts.models import Team
from apps.cluster.models import Gpu, GpuNode
from apps.dashboard import fanout

from . import pass_stats, policy
from .models import Allocation, Job, QueueEntry, SchedulerState
from .services import allocate_queued, transition
from .states import LIVE, IllegalTransition, JobState
from .usage import month_start

log = logging.getLogger(__name__)

# An arbitrary 64-bit key that names "the scheduling pass" among PostgreSQL advisory locks.
PASS_LOCK_KEY = 0x6465_6570_6F70_7431
ESTIMATOR_HISTORY = 2000  # completed jobs the run-time estimator learns from
ETA_LIMIT = 1000
# Ends closer than this are played as one event in the ETA forecast (ETAs are shown to the minute).
ETA_RESOLUTION_S = 30.0
ETA_REFRESH_S = 15.0
_etas_at = -ETA_REFRESH_S  # monotonic time of this process's last ETA computation


def policy_config() -> policy.PolicyConfig:
    return policy.PolicyConfig(**getattr(settings, "DEEPOPT_SCHEDULER", {}))


def _ts(value: datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


def _dt(value: float | None) -> datetime | None:
    return datetime.fromtimestamp(value, tz=timezone.get_current_timezone()) if value is not None else None


def build_estimator(config: policy.PolicyConfig) -> policy.RuntimeEstimator:
    """Learn run times from the latest completed jobs; a job's own true duration is never an input."""
    estimator = policy.RuntimeEstimator(config)
    done = (
        Job.objects.filter(state=JobState.SUCCEEDED, started_at__isnull=False, finished_at__isnull=False)
        .order_by("-finished_at")
        .values_list("team_id", "kind", "gpus", "started_at", "finished_at")[:ESTIMATOR_HISTORY]
    )
    estimator.observe_many(
        (team, kind, gpus, (end - start).total_seconds()) for team, kind, gpus, start, end in reversed(done)
    )
    return estimator


def build_snapshot(now: datetime, config: policy.PolicyConfig, waiting: Collection[int] = ()) -> policy.Snapshot:
    """The cluster and the queue as the policy core sees them; `waiting`: queued jobs left out (they wait
    for other jobs to succeed, see `_dependencies`)."""
    now_s = now.timestamp()
    live_allocs = list(
        Allocation.objects.filter(released_at__isnull=True).values_list("job_id", "node_id", "gpu_id")
    )
    busy = {gpu_id for _, _, gpu_id in live_allocs}
    gpus_by_node: dict[int, list[policy.GpuSpec]] = {}
    for gpu_id, node_id, index, memory in Gpu.objects.values_list("id", "node_id", "index", "memory_mb"):
        gpus_by_node.setdefault(node_id, []).append(policy.GpuSpec(gpu_id, index, memory))
    nodes = [
        policy.NodeSpec(
            id=node_id, name=name, rack=rack, state=state, gpus=tuple(gpus_by_node.get(node_id, ())),
            free_gpu_ids=frozenset(g.gpu_id for g in gpus_by_node.get(node_id, ()) if g.gpu_id not in busy),
        )
        for node_id, name, rack, state in GpuNode.objects.values_list("id", "name", "rack", "state")
    ]

    held: dict[int, dict[int, list[int]]] = {}
    for job_id, node_id, gpu_id in live_allocs:
        held.setdefault(job_id, {}).setdefault(node_id, []).append(gpu_id)
    running = [
        policy.RunningJob(
            id=job_id, team=team_id, kind=kind, gpus=held.get(job_id, {}),
            start=_ts(started or updated), walltime_s=wall * 60 if wall else None,
            ran_s=ran_s, preemptions=preemptions, preempting=state == JobState.PREEMPTING,
        )
        for job_id, team_id, kind, started, updated, wall, ran_s, preemptions, state in (
            Job.objects.filter(state__in=LIVE).values_list(
                "id", "team_id", "kind", "started_at", "updated_at", "walltime_minutes", "ran_seconds",
                "preemptions", "state",
            )
        )
    ]
    # A job keeps the estimate and WFQ tags it was stamped with (its queue row) until it leaves the queue.
    queued = [
        policy.QueuedJob(
            id=job_id, team=team_id, kind=kind, gpus=gpus, nodes=n_nodes, priority=priority,
            gpu_memory_mb=int(memory * 1024) if memory else None, walltime_s=wall * 60 if wall else None,
            submit=submitted.timestamp(), attempt=attempt,
            estimated_runtime_s=estimate, start_tag=start if estimate is not None else None,
            finish_tag=finish if estimate is not None else None, ran_s=ran_s, preemptions=preemptions,
        )
        for (job_id, team_id, kind, gpus, n_nodes, priority, memory, wall, submitted, attempt,
             estimate, start, finish, ran_s, preemptions) in (
            Job.objects.filter(state=JobState.QUEUED).order_by("submitted_at", "id").values_list(
                "id", "team_id", "kind", "gpus", "nodes", "priority", "gpu_memory_gb", "walltime_minutes",
                "submitted_at", "attempt", "queue_entry__estimate_s", "queue_entry__start_tag",
                "queue_entry__finish_tag", "ran_seconds", "preemptions",
            )
        )
        if job_id not in waiting
    ]
    state = SchedulerState.objects.filter(pk=1).values_list("virtual_time", "flow_finish").first()
    virtual_time, flow_finish = state if state else (None, {})
    return policy.Snapshot(now=now_s, nodes=nodes, running=running, queued=queued,
                           teams=_team_specs(now, config), virtual_time=virtual_time,
                           flow_finish=_flow_keys(flow_finish))


def _flow_keys(stored: dict) -> dict:
    """SchedulerState.flow_finish ("team id:kind" -> tag) as the core's {(team id, kind): tag}."""
    out = {}
    for key, tag in stored.items():
        team, _, kind = key.partition(":")
        if team.isdigit():
            out[(int(team), kind)] = float(tag)
    return out


def _save_wfq_state(decision: policy.Decision) -> None:
    SchedulerState.objects.update_or_create(pk=1, defaults={
        "virtual_time": decision.virtual_time,
        "flow_finish": {f"{team}:{kind}": tag for (team, kind), tag in decision.flow_finish.items()},
    })


def _team_specs(now: datetime, config: policy.PolicyConfig) -> list[policy.TeamSpec]:
    """Teams with this month's GPU-seconds and their decayed usage, both from allocation rows."""
    start_of_month = month_start(now)
    horizon = now - timedelta(seconds=config.fair_share_half_life_s * 8)  # older usage weighs < 0.4%
    since = min(start_of_month, horizon)
    intervals: dict[int, list[tuple[float, float | None, int]]] = {}
    month_s: dict[int, float] = {}
    recent = Allocation.objects.filter(Q(released_at__isnull=True) | Q(released_at__gt=since))
    for team_id, created, released in recent.values_list("job__team_id", "created_at", "released_at"):
        intervals.setdefault(team_id, []).append((created.timestamp(), _ts(released), 1))
        end = released or now
        begin = max(created, start_of_month)
        if end > begin:
            month_s[team_id] = month_s.get(team_id, 0.0) + (end - begin).total_seconds()
    now_s = now.timestamp()
    return [
        policy.TeamSpec(
            id=team.pk, name=team.name, weight=team.weight, max_gpus=team.max_gpus,
            gpu_hours_per_month=team.gpu_hours_per_month, max_gpus_per_job=team.max_gpus_per_job,
            gpu_seconds_used_this_month=month_s.get(team.pk, 0.0),
            decayed_usage=policy.decayed_usage(intervals.get(team.pk, ()), now_s, config.fair_share_half_life_s),
        )
        for team in Team.objects.all()
    ]


@dataclass
class PassResult:
    placed: list[int]
    queued: int
    pass_ms: float
    policy_ms: float
    skipped: bool = False
    etas: bool = False  # whether this pass computed ETAs (see _etas_due)
    eta_ms: float | None = None  # the ETA forecast and its write, after the pass committed
    preempted: list[int] = field(default_factory=list)  # running jobs this pass told to stop and requeue


def _lock() -> None:
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            # Waits for a pass in progress: the event that asked for this pass may have committed
            # after that pass read its snapshot, so skipping here could strand a job until the tick.
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [PASS_LOCK_KEY - 2**63])


def _etas_due(with_etas: bool | None) -> bool:
    """ETAs are the expensive part of a pass (a forward play of the first ETA_LIMIT jobs, about 0.5 s at
    10,000 queued): a pass computes them when asked to, or when this process last did ETA_REFRESH_S ago.
    Passes in between keep the ETAs already written; a job that just arrived shows none until the next."""
    global _etas_at
    if with_etas is not None:
        due = with_etas
    else:
        due = time.monotonic() - _etas_at >= getattr(settings, "DEEPOPT_ETA_REFRESH_S", ETA_REFRESH_S)
    if due:
        _etas_at = time.monotonic()
    return due


def run_pass(now: datetime | None = None, *, with_etas: bool | None = None) -> PassResult:
    """One scheduling pass: snapshot, policy, allocations, queue entries; then, when due, the queue's ETAs.
    Returns what it did.

    The pass commits its allocations and queue rows before the ETAs are computed: the forecast plays
    1,000 jobs forward (about half a second on a 10,000-job queue) and neither the jobs it starts nor the
    other passes waiting on the lock should wait for it. The ETAs come from the same snapshot and are
    written in a second short transaction, unless a newer pass has written the queue meanwhile.

    `with_etas`: True or False to force or skip the ETAs; None (the default) computes them at most every
    ETA_REFRESH_S seconds in this process."""
    began = time.perf_counter()
    config = policy_config()
    with transaction.atomic():
        _lock()
        now = now or timezone.now()
        waiting = _dependencies()
        holds = _holds()
        snapshot = build_snapshot(now, config, waiting.keys() | holds.keys())
        estimator = build_estimator(config)
        t0 = time.perf_counter()
        decision = policy.schedule(snapshot, estimator, config, format_time=policy.default_format_time)
        policy_ms = (time.perf_counter() - t0) * 1000
        placed = _allocate(decision, now)
        preempted = _preempt(decision)
        held, held_teams = _held_rows(waiting, len(decision.pending), holds)
        written, etas = _write_queue(decision, None, now, held)  # the ETAs already written stay until refreshed
        _save_wfq_state(decision)
        # The live pages hear of the held jobs too: (team, position, reason, code) each.
        held_view = {j: (held_teams[j], row[0], row[_REASON], row[_CODE]) for j, row in held.items()}
        fanout.queue_changed(snapshot, decision, etas, placed, written, held=held_view)  # sent after the commit
        eta_due = bool(decision.pending) and _etas_due(with_etas)
    pass_ms = (time.perf_counter() - began) * 1000
    pass_stats.record_pass(pass_ms, policy_ms, len(placed), len(decision.pending))
    eta_ms = None
    if eta_due:
        t1 = time.perf_counter()
        _refresh_etas(snapshot, estimator, config, decision, placed, now, held_view)
        eta_ms = (time.perf_counter() - t1) * 1000
    return PassResult(placed=placed, queued=len(decision.pending), policy_ms=policy_ms, pass_ms=pass_ms,
                      etas=eta_due, eta_ms=eta_ms, preempted=preempted)


def _refresh_etas(snapshot: policy.Snapshot, estimator: policy.RuntimeEstimator, config: policy.PolicyConfig,
                  decision: policy.Decision, placed: list[int], now: datetime, held_view: dict | None = None) -> None:
    """ETAs for the first ETA_LIMIT queued jobs of the pass (the others: unknown), written where they
    changed. Playing a 10,000-job queue forward on every pass would cost seconds; jobs further back show
    "unknown" until they move up."""
    etas = policy.forecast_etas(snapshot, estimator, config, limit=ETA_LIMIT, resolution_s=ETA_RESOLUTION_S)
    with transaction.atomic():
        _lock()
        if QueueEntry.objects.filter(updated_at__gt=now).exists():
            return  # a newer pass wrote the queue: these ETAs are of an older state; its own will follow
        current = dict(QueueEntry.objects.values_list("job_id", "eta"))
        changed = []
        for job_id in decision.pending:
            if job_id not in current:
                continue
            eta = _dt(etas.get(job_id))
            if current[job_id] != eta:
                changed.append((job_id, eta))
        _update_etas(changed)
        if changed:
            fanout.queue_changed(snapshot, decision, etas, placed, [job_id for job_id, _ in changed], etas_only=True,
                                 held=held_view)


def _update_etas(changed: list[tuple[int, datetime | None]]) -> None:
    if not changed:
        return
    if connection.vendor != "postgresql":
        QueueEntry.objects.bulk_update([QueueEntry(job_id=job_id, eta=eta) for job_id, eta in changed], ["eta"],
                                       batch_size=2000)
        return
    table = QueueEntry._meta.db_table
    column = QueueEntry._meta.get_field("eta").column
    rows = json.dumps([[job_id, eta.isoformat() if eta else None] for job_id, eta in changed], separators=(",", ":"))
    with connection.cursor() as cursor:
        cursor.execute(
            f'UPDATE "{table}" AS q SET "{column}" = (e->>1)::timestamptz '  # noqa: S608 - names from the model
            f'FROM json_array_elements(%s::json) AS e WHERE q."job_id" = (e->>0)::bigint', [rows])


def _preempt(decision: policy.Decision) -> list[int]:
    """Running jobs the pass stops to make room: each goes `preempting` (its workers are told to stop on
    their next poll, about a second) and back to `queued` when they confirm; the job it makes room for
    is placed by the pass that follows. A job that ended or was cancelled since the snapshot is left be."""
    done = []
    for job_id, reason in decision.preemptions.items():
        try:
            transition(job_id, JobState.PREEMPTING, message=reason[:1000])
        except (IllegalTransition, Job.DoesNotExist):
            continue
        done.append(job_id)
    return done


def _allocate(decision: policy.Decision, now: datetime) -> list[int]:
    if not decision.placements:
        return []
    wanted = {gpu for places in decision.placements.values() for _, gpus in places for gpu in gpus}
    # Re-read the chosen GPUs and the jobs under row locks: the pass lock keeps other passes out, but an
    # administrator's node change, a worker's release or a user's cancel may have landed since the snapshot.
    locked = {g.pk: g for g in Gpu.objects.select_for_update().select_related("node").filter(pk__in=wanted)}
    taken = set(Allocation.objects.filter(gpu_id__in=wanted, released_at__isnull=True)
                .values_list("gpu_id", flat=True))
    jobs = Job.objects.select_for_update().in_bulk(list(decision.placements))
    placements = []
    for job_id, places in decision.placements.items():
        job = jobs.get(job_id)
        gpu_ids = [gpu for _, gpus in places for gpu in gpus]
        if job is None or job.state != JobState.QUEUED:
            continue
        usable = all(g in locked and g not in taken and locked[g].node.state == GpuNode.State.ACTIVE
                     for g in gpu_ids)
        if not usable:
            continue  # the next pass sees the new state and places the job elsewhere
        taken.update(gpu_ids)
        where = ", ".join(f"{locked[gpus[0]].node.name}:{','.join(str(locked[g].index) for g in gpus)}"
                          for _, gpus in places)
        placements.append((
            job,
            [Allocation(job=job, attempt=job.attempt, gpu_id=g, node_id=locked[g].node_id) for g in gpu_ids],
            f"Allocated {len(gpu_ids)} GPU(s) on {where}.",
            {"gpus": gpu_ids, "nodes": [node for node, _ in places]},
        ))
    return [job.pk for job in allocate_queued(placements)]


QUEUE_FIELDS = ("position", "flow", "start_tag", "finish_tag", "estimate_s", "reason", "code", "eta",
                "reserved_at")
_SQL_TYPES = {"position": "integer", "flow": "text", "start_tag": "double precision",
              "finish_tag": "double precision", "estimate_s": "double precision", "reason": "text", "code": "text",
              "eta": "timestamptz", "reserved_at": "timestamptz"}
_ETA = QUEUE_FIELDS.index("eta")
_REASON = QUEUE_FIELDS.index("reason")
_CODE = QUEUE_FIELDS.index("code")

Row = tuple  # a queue row's QUEUE_FIELDS values, in that order


def _json_rows(rows: list[tuple[int, Row]]) -> str:
    """Rows as one JSON array of arrays: PostgreSQL unpacks it in C (json_array_elements), where handing
    it nine arrays of 10,000 values made psycopg dump each value in Python (a fifth of a pass)."""
    return json.dumps([[job_id, *(v.isoformat() if isinstance(v, datetime) else v for v in values)]
                       for job_id, values in rows], separators=(",", ":"))


def _json_columns() -> str:
    return ", ".join(f"(e->>{i + 1})::{_SQL_TYPES[f]}" for i, f in enumerate(QUEUE_FIELDS))


def _insert_entries(created: list[tuple[int, Row]], now: datetime) -> None:
    if not created:
        return
    if connection.vendor != "postgresql":
        QueueEntry.objects.bulk_create(
            [QueueEntry(job_id=job_id, updated_at=now, **dict(zip(QUEUE_FIELDS, values, strict=True)))
             for job_id, values in created], batch_size=2000)
        return
    table = QueueEntry._meta.db_table
    columns = ", ".join(f'"{QueueEntry._meta.get_field(f).column}"' for f in QUEUE_FIELDS)
    sql = (f'INSERT INTO "{table}" ("job_id", {columns}, "updated_at") '  # noqa: S608 - names from the model
           f"SELECT (e->>0)::bigint, {_json_columns()}, %s FROM json_array_elements(%s::json) AS e")
    with connection.cursor() as cursor:
        cursor.execute(sql, [now, _json_rows(created)])


def _update_entries(changed: list[tuple[int, Row]], now: datetime) -> None:
    """Write the changed queue rows. When time moves on, most ETAs of a 10,000-job queue change at once:
    Django's bulk_update builds one CASE per field and row (seconds for 10,000 rows), so PostgreSQL gets
    one UPDATE ... FROM json_array_elements(one JSON text) instead; other databases get bulk_update."""
    if not changed:
        return
    if connection.vendor != "postgresql":
        QueueEntry.objects.bulk_update(
            [QueueEntry(job_id=job_id, updated_at=now, **dict(zip(QUEUE_FIELDS, values, strict=True)))
             for job_id, values in changed], [*QUEUE_FIELDS, "updated_at"], batch_size=2000)
        return
    table = QueueEntry._meta.db_table
    columns = [QueueEntry._meta.get_field(f).column for f in QUEUE_FIELDS]
    assignments = ", ".join(f'"{column}" = v."{column}"' for column in columns)
    names = ", ".join(f'"{column}"' for column in columns)
    sql = (f'UPDATE "{table}" AS q SET {assignments}, "updated_at" = %s '  # noqa: S608 - names from the model
           f"FROM (SELECT (e->>0)::bigint AS job_id, {_json_columns()} FROM json_array_elements(%s::json) AS e) "
           f'AS v("job_id", {names}) WHERE q."job_id" = v."job_id"')
    with connection.cursor() as cursor:
        cursor.execute(sql, [now, _json_rows(changed)])


def _dependencies() -> dict[int, list[tuple[int, str]]]:
    """Queued jobs that wait for other jobs to succeed: job id -> [(dependency id, its state)], the
    dependencies not yet succeeded. One whose dependency failed or was cancelled is cancelled here, with
    the reason, and is not in the result. (One query a pass, on the dependency table.)"""
    waiting: dict[int, list[tuple[int, str]]] = {}
    for job_id, dep_id, dep_state in (
        Job.depends_on.through.objects.filter(from_job__state=JobState.QUEUED)
        .exclude(to_job__state=JobState.SUCCEEDED).order_by("from_job_id", "to_job_id")
        .values_list("from_job_id", "to_job_id", "to_job__state")
    ):
        waiting.setdefault(job_id, []).append((dep_id, dep_state))
    for job_id, deps in list(waiting.items()):
        dead = [(dep_id, state) for dep_id, state in deps if state in (JobState.FAILED, JobState.CANCELLED)]
        if dead:
            del waiting[job_id]
            dep_id, state = dead[0]
            try:
                transition(job_id, JobState.CANCELLED,
                           message=f"Cancelled: job {dep_id}, which it waited for, ended {state}.",
                           data={"dependency": dep_id, "dependency_state": state})
            except IllegalTransition:
                pass  # it left the queue meanwhile
    return waiting


def _holds() -> dict[int, str]:
    """Queued jobs a user holds (`hold_job`): job id -> who held it. (One query a pass.)"""
    return dict(Job.objects.filter(state=JobState.QUEUED, held=True).values_list("id", "held_by"))


def _held_rows(held: dict[int, list[tuple[int, str]]], after: int,
               holds: dict[int, str] | None = None) -> tuple[dict[int, Row], dict[int, int]]:
    """Queue rows for the jobs held back — by their dependencies, or by a user's hold — after the `after` jobs
    the policy placed in order, oldest first: a reason that says what they wait for, code `dependency` or
    `held`, no tags and no ETA; and each one's team id."""
    holds = holds or {}
    if not held and not holds:
        return {}, {}
    rows: dict[int, Row] = {}
    teams: dict[int, int] = {}
    jobs = (Job.objects.filter(pk__in=held.keys() | holds.keys()).order_by("submitted_at", "id")
            .values_list("id", "team_id", "team__name", "kind"))
    # The dependencies' states as this pass leaves them (it may just have started one).
    now_state = dict(Job.objects.filter(pk__in={d for deps in held.values() for d, _ in deps})
                     .values_list("id", "state"))
    for position, (job_id, team_id, team_name, kind) in enumerate(jobs, start=after + 1):
        teams[job_id] = team_id
        parts = []
        if job_id in holds:
            parts.append(f"Held by {holds[job_id] or 'a user'}: it starts only once released.")
        deps = held.get(job_id)
        if deps:
            what = " and ".join(f"{dep_id} ({now_state.get(dep_id, state)})" for dep_id, state in deps)
            parts.append(f"Waits for job{'s' if len(deps) > 1 else ''} {what} to succeed.")
        code = "held" if job_id in holds else "dependency"
        rows[job_id] = (position, f"{team_name}/{kind}", 0.0, 0.0, None, " ".join(parts)[:300], code, None, None)
    return rows, teams


def _write_queue(decision: policy.Decision, etas: dict | None, now: datetime,
                 held: dict[int, Row] | None = None) -> tuple[set, dict]:
    """Bring the QueueEntry rows in line with the pass, touching only what changed. A queued job's reason
    lives there only (Job.waiting_reason): reasons name a position ("behind 7,371 jobs"), so after an end
    nearly every one changes, and copying them into the jobs too cost a second 10,000-row UPDATE.

    The rows are read as tuples (no model instances: 10,000 of them were a fifth of a pass) and compared
    whole. `etas` None keeps the ETAs already written. Returns the ids of the jobs whose rows changed and
    the ETAs now in force."""
    existing: dict[int, Row] = {row[0]: row[1:] for row in QueueEntry.objects.values_list("job_id", *QUEUE_FIELDS)}
    if etas is None:
        etas = {job_id: row[_ETA].timestamp() for job_id, row in existing.items() if row[_ETA] is not None}
    held = held or {}
    stale = set(existing) - set(decision.pending) - set(held)
    if stale:
        QueueEntry.objects.filter(job_id__in=stale).delete()
    changed: list[tuple[int, Row]] = []
    created: list[tuple[int, Row]] = []
    reservations, stamps = decision.reservations, decision.stamps
    rows: dict[int, Row] = {}
    for job_id, pending in decision.pending.items():
        reservation = reservations.get(job_id)
        stamp = stamps.get(job_id)
        rows[job_id] = (pending.position, pending.flow, pending.start_tag, pending.finish_tag,
                        stamp[0] if stamp else None, pending.reason[:300], pending.code, _dt(etas.get(job_id)),
                        _dt(reservation.time) if reservation else None)
    rows.update(held)
    for job_id, values in rows.items():
        old = existing.get(job_id)
        if old is None:
            created.append((job_id, values))
        elif old != values:
            changed.append((job_id, values))
    _insert_entries(created, now)
    _update_entries(changed, now)
    return stale | {job_id for job_id, _ in created} | {job_id for job_id, _ in changed}, etas

