"""What the pages render first so that live events (static/js/live.js) can carry on from it: a job's
progress and log so far, the latest GPU readings of nodes, and the GPUs of the dashboard's nodes."""
from __future__ import annotations

import json
from collections.abc import Iterable

from django.db.models import Count, Exists, OuterRef, Q

from apps.cluster.models import Gpu, GpuNode, MetricSample
from apps.scheduling.models import Allocation, Job, JobEvent

LOG_LINES_SHOWN = 200


def job_progress(job) -> dict:  # noqa: ANN001
    """The last LOG_LINES_SHOWN progress lines of the job (oldest first) and where the latest one stands."""
    rows = list(JobEvent.objects.filter(job=job, kind=JobEvent.Kind.PROGRESS)
                .order_by("-ts", "-id").values("attempt", "message", "data", "ts")[:LOG_LINES_SHOWN])
    rows.reverse()
    progress = None
    for row in reversed(rows):
        data = row["data"] or {}
        percent = data.get("pct")
        if not _number(percent) and _number(data.get("step")) and _number(data.get("steps")) and data["steps"] > 0:
            percent = 100.0 * data["step"] / data["steps"]
        if _number(percent):
            progress = {"percent": round(float(percent), 1), "step": data.get("step"), "steps": data.get("steps"),
                        "stage": data.get("stage"), "attempt": row["attempt"]}
            break
    return {"progress": progress, "log_lines": rows}


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def training_curve(job, log_rows: list[dict]) -> dict | None:  # noqa: ANN001
    """A training job's loss by step, for the job page's chart (static/js/charts.js). Once the run has
    reported its result: the result's `loss_curve` (rank 0's loss at up to 20 steps over the whole run)
    and its held-out `eval_loss`. Before that: the steps among the progress lines shown (`log_rows`, the
    latest attempt's), which the page extends as progress events arrive. None for other jobs, and for a
    training job that has neither (queued, or ended without a result)."""
    if job.kind != Job.Kind.TRAINING:
        return None
    steps = job.spec.get("steps") if isinstance(job.spec, dict) else None
    base = {"job": job.pk, "steps": steps if _number(steps) else None}
    result = job.result if isinstance(job.result, dict) else {}
    curve = result.get("loss_curve")
    points = [[p[0], p[1]] for p in curve if isinstance(p, list | tuple) and len(p) == 2
              and _number(p[0]) and _number(p[1])] if isinstance(curve, list) else []
    if points:
        eval_loss = result.get("eval_loss")
        return {**base, "source": "result", "points": points, "eval_loss": eval_loss if _number(eval_loss) else None}
    attempt = max((row["attempt"] for row in log_rows), default=job.attempt)
    lines = (row["data"] or {} for row in log_rows if row["attempt"] == attempt)
    points = [[data["step"], data["loss"]] for data in lines if _number(data.get("step")) and _number(data.get("loss"))]
    if not points and job.state not in (Job.State.ALLOCATED, Job.State.RUNNING):
        return None
    return {**base, "source": "log", "points": points, "eval_loss": None}


def latest_gpu_readings(nodes: Iterable[GpuNode]) -> dict[tuple[int, int], MetricSample]:
    """Each GPU's reading from its node's latest heartbeat, by (node id, GPU index): one query."""
    beats = Q()
    for node in nodes:
        if node.last_heartbeat_at is not None:
            beats |= Q(node_id=node.pk, ts=node.last_heartbeat_at)
    if not beats:
        return {}
    return {(s.node_id, s.gpu_index): s for s in MetricSample.objects.filter(beats, gpu_index__isnull=False)}


def attach_readings(nodes: Iterable[GpuNode], gpus_of) -> None:  # noqa: ANN001
    """Set `reading` on each GPU (None when its node has not heartbeaten); gpus_of(node) lists a node's GPUs."""
    nodes = list(nodes)
    readings = latest_gpu_readings(nodes)
    for node in nodes:
        for gpu in gpus_of(node):
            gpu.reading = readings.get((node.pk, gpu.index))


def node_gpus_json(nodes) -> str:  # noqa: ANN001
    """{node id: [busy GPUs, GPUs, state]} of the given nodes, for the dashboard's live GPU counts."""
    live = Allocation.objects.filter(gpu=OuterRef("pk"), released_at__isnull=True)
    counts = {row["node_id"]: row for row in Gpu.objects.filter(node__in=nodes).order_by().values("node_id")
              .annotate(total=Count("id"), busy=Count("id", filter=Exists(live)))}
    return json.dumps({
        str(node_id): [counts.get(node_id, {}).get("busy", 0), counts.get(node_id, {}).get("total", 0), state]
        for node_id, state in nodes.order_by().values_list("id", "state")
    }, separators=(",", ":"))
