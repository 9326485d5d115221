"""Server-rendered pages. Every object is read through its `visible_to(user)` queryset, so another team's
job, node or team is a 404 here exactly as in the API, and every verb goes through the app's services."""
from __future__ import annotations

from dataclasses import dataclass

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db.models import Count, Exists, OuterRef, Prefetch, Q, Subquery
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from apps.accounts.models import Team
from apps.accounts.permissions import can_cancel_job, can_manage_team, team_ids_of
from apps.cluster import services as cluster_services
from apps.cluster.models import Gpu, GpuNode
from apps.scheduling import services as scheduling_services
from apps.scheduling.api.serializers import JobCreateSerializer
from apps.scheduling.api.uploads import ModelUploadCreateSerializer, store_upload
from apps.scheduling.api.views import JobFilter
from apps.scheduling.models import Allocation, Job, JobArtifact, JobEvent, ModelUpload
from apps.scheduling.specs import COMPRESSION_MODELS, TRAINING_MODELS
from apps.scheduling.states import LIVE, TERMINAL, IllegalTransition
from apps.scheduling.usage import team_usage

from . import live_context
from .forms import FORMAT_PRESETS, NON_FIELD, JobForm
from .load import load_context, team_charts

JOBS_PER_PAGE = 50
RECENT_JOBS = 10


def _live_allocation_of_gpu():  # noqa: ANN202
    return Allocation.objects.filter(gpu=OuterRef("pk"), released_at__isnull=True)


def _gpus_with_busy_flag():  # noqa: ANN202
    return Gpu.objects.annotate(busy=Exists(_live_allocation_of_gpu())).order_by("index")


@dataclass(frozen=True)
class Meter:
    """One 'used of quota' bar."""

    used: float
    limit: float

    @property
    def percent(self) -> int:
        if self.limit <= 0:
            return 100 if self.used > 0 else 0
        return min(100, round(100 * self.used / self.limit))

    @property
    def level(self) -> str:
        return "danger" if self.percent >= 90 else "warn" if self.percent >= 70 else "ok"


@dataclass(frozen=True)
class TeamUsageRow:
    team: Team
    gpus: Meter
    gpu_hours: Meter
    queued_jobs: int
    running_jobs: int


def _usage_rows(teams: list[Team]) -> list[TeamUsageRow]:
    usage = team_usage(teams)
    return [
        TeamUsageRow(
            team=team,
            gpus=Meter(usage[team.pk].gpus_in_use, team.max_gpus),
            gpu_hours=Meter(round(usage[team.pk].gpu_hours_this_month, 1), team.gpu_hours_per_month),
            queued_jobs=usage[team.pk].queued_jobs,
            running_jobs=usage[team.pk].running_jobs,
        )
        for team in teams
    ]


@login_required
def dashboard(request: HttpRequest) -> HttpResponse:
    user = request.user
    nodes = GpuNode.objects.visible_to(user)
    by_state = dict(nodes.order_by().values_list("state").annotate(n=Count("id")))
    node_states = [(value, label, by_state.get(value, 0)) for value, label in GpuNode.State.choices]
    live = _live_allocation_of_gpu()
    gpus = Gpu.objects.filter(node__in=nodes).aggregate(
        total=Count("id"),
        used=Count("id", filter=Exists(live)),
        free=Count("id", filter=~Exists(live) & Q(node__state=GpuNode.State.ACTIVE)),
    )
    jobs = Job.objects.visible_to(user)
    job_counts = jobs.aggregate(
        queued=Count("id", filter=Q(state=Job.State.QUEUED)),
        running=Count("id", filter=Q(state__in=LIVE)),
    )
    teams = list(Team.objects.visible_to(user))
    return render(request, "dashboard/dashboard.html", {
        "node_states": node_states,
        "node_total": sum(by_state.values()),
        "gpus": gpus,
        "gpus_unavailable": gpus["total"] - gpus["used"] - gpus["free"],
        "gpus_used_meter": Meter(gpus["used"], gpus["total"]),
        "queued": job_counts["queued"],
        "running": job_counts["running"],
        "recent_jobs": jobs.select_related("team", "submitter")[:RECENT_JOBS],
        "usage_rows": _usage_rows(teams),
        "single_team": len(teams) == 1,
        "node_gpus_json": live_context.node_gpus_json(nodes),
        **load_context(user),
    })


@login_required
def job_list(request: HttpRequest) -> HttpResponse:
    jobs = Job.objects.visible_to(request.user).select_related("team", "submitter")
    # The API's own filter, so `?state=queued&kind=training` means the same on the page and in the API.
    filtered = JobFilter(request.GET, queryset=jobs).qs
    query = request.GET.get("q", "").strip()
    if query:
        filtered = filtered.filter(name__icontains=query)
    page = Paginator(filtered, JOBS_PER_PAGE).get_page(request.GET.get("page"))
    return render(request, "dashboard/job_list.html", {
        "page": page,
        "teams": Team.objects.visible_to(request.user),
        "states": Job.State.choices,
        "kinds": Job.Kind.choices,
        "priorities": Job.Priority.choices,
        "selected": {
            "state": request.GET.getlist("state"),
            "kind": request.GET.get("kind", ""),
            "team": request.GET.get("team", ""),
            "priority": request.GET.get("priority", ""),
            "q": query,
        },
        "filtering": any(request.GET.get(k) for k in ("state", "kind", "team", "priority", "q")),
    })


@login_required
def job_new(request: HttpRequest) -> HttpResponse:
    teams = list(Team.objects.visible_to(request.user))
    if request.method == "POST":
        form = JobForm.from_post(request.POST)
        serializer = JobCreateSerializer(data=form.payload(), context={"request": request})
        if serializer.is_valid():
            job = serializer.save()
            # True only while the job waits: the job page's live script removes it when the job moves on.
            messages.success(request, f"Job #{job.pk} “{job.name}” is in the queue.", extra_tags="while-queued")
            return redirect("job", pk=job.pk)
        form.set_errors(serializer.errors)
        status = 400
    else:
        form = JobForm()
        if len(teams) == 1:
            form.values["team"] = str(teams[0].pk)
        status = 200
    return render(request, "dashboard/job_form.html", {
        "form": form,
        "v": form.values,
        "e": form.errors,
        "non_field_errors": form.errors.get(NON_FIELD, []),
        "teams": teams,
        "kinds": Job.Kind.choices,
        "priorities": Job.Priority.choices,
        "compression_models": COMPRESSION_MODELS,
        "model_uploads": ModelUpload.objects.visible_to(request.user).select_related("team")[:200],
        "training_models": TRAINING_MODELS,
        "quantization_modes": [("auto", "Auto — search per layer"), ("preset", "Preset"), ("off", "Off")],
        "roundings": [("gptq", "GPTQ — from calibration data"), ("rtn", "To nearest")],
        "format_presets": [(key, label) for key, (label, _) in FORMAT_PRESETS.items()],
        "codecs": ["none", "bf16", "int8", "int4", "topk:0.01", "powersgd:4"],
        # The side panel shows the limits of the user's own teams (not every team, for staff).
        "usage_rows": _usage_rows([t for t in teams if t.pk in team_ids_of(request.user)]),
    }, status=status)


@login_required
def job_detail(request: HttpRequest, pk: int) -> HttpResponse:
    job = get_object_or_404(
        Job.objects.visible_to(request.user).select_related("team", "submitter", "queue_entry"), pk=pk
    )
    allocations = (Allocation.objects.filter(job=job, released_at__isnull=True)
                   .select_related("gpu", "node").order_by("node__name", "gpu__index"))
    progress = live_context.job_progress(job)
    return render(request, "dashboard/job_detail.html", {
        "job": job,
        # Progress lines are the Progress card's log (its last LOG_LINES_SHOWN); a training job writes
        # thousands, so the timeline keeps to state changes and notes and only counts them.
        "events": (JobEvent.objects.filter(job=job).exclude(kind=JobEvent.Kind.PROGRESS)
                   .select_related("actor").order_by("-ts", "-id")),
        "progress_count": JobEvent.objects.filter(job=job, kind=JobEvent.Kind.PROGRESS).count(),
        "allocations": allocations,
        "artifacts": JobArtifact.objects.filter(job=job).select_related("node").order_by("-attempt", "name"),
        "weights_upload": (ModelUpload.objects.filter(pk=job.spec.get("weights"), team_id=job.team_id).first()
                           if job.kind == Job.Kind.COMPRESSION and isinstance(job.spec, dict)
                           and isinstance(job.spec.get("weights"), int) else None),
        "can_cancel": (job.state not in TERMINAL and job.state != Job.State.CANCELLING
                       and can_cancel_job(request.user, job)),
        "queue": getattr(job, "queue_entry", None) if job.state == Job.State.QUEUED else None,
        **progress,
        "training_curve": live_context.training_curve(job, progress["log_lines"]),
    })


@login_required
def queue(request: HttpRequest) -> HttpResponse:
    """The queue as the scheduler saw it in its latest pass: the same rows as GET /api/v1/queue/."""
    from apps.accounts.permissions import team_ids_of
    from apps.scheduling.models import QueueEntry

    entries = QueueEntry.objects.select_related("job", "job__team").filter(job__state=Job.State.QUEUED)
    if not request.user.is_staff:
        entries = entries.filter(job__team_id__in=team_ids_of(request.user))
    page = Paginator(entries.order_by("position"), 50).get_page(request.GET.get("page"))
    return render(request, "dashboard/queue.html", {"page": page})


def _job_to_act_on(request: HttpRequest, pk: int, verb: str) -> Job:
    """The job, if the user may see it (else 404) and cancel, hold or release it (else 403)."""
    job = get_object_or_404(Job.objects.visible_to(request.user), pk=pk)
    if not can_cancel_job(request.user, job):
        raise PermissionDenied(f"Only the job's submitter, a lead of its team or staff can {verb} it.")
    return job


@login_required
@require_POST
def job_cancel(request: HttpRequest, pk: int) -> HttpResponse:
    job = _job_to_act_on(request, pk, "cancel")
    try:
        job = scheduling_services.cancel_job(job, actor=request.user)
    except IllegalTransition:
        job.refresh_from_db(fields=["state"])
        messages.error(request, f"Job #{job.pk} is {job.state}; there is nothing to cancel.")
    else:
        if job.state == Job.State.CANCELLED:
            messages.success(request, f"Job #{job.pk} was cancelled.")
        else:
            messages.info(request, f"Cancel requested; job #{job.pk} stops when its worker confirms.")
    return redirect("job", pk=pk)


@login_required
@require_POST
def job_hold(request: HttpRequest, pk: int) -> HttpResponse:
    """Hold a queued job, or release it (`release=1`)."""
    job = _job_to_act_on(request, pk, "hold or release")
    release = request.POST.get("release") == "1"
    try:
        job = (scheduling_services.release_job if release else scheduling_services.hold_job)(job, actor=request.user)
    except IllegalTransition:
        job.refresh_from_db(fields=["state"])
        messages.error(request, f"Job #{job.pk} is {job.state}; only a queued job can be held or released.")
    else:
        messages.success(request, f"Job #{job.pk} was released: the scheduler takes it up in its next pass."
                         if release else f"Job #{job.pk} is held: it stays queued until you release it.")
    return redirect("job", pk=pk)


@login_required
def node_list(request: HttpRequest) -> HttpResponse:
    nodes = (GpuNode.objects.visible_to(request.user).select_related("team")
             .prefetch_related(Prefetch("gpus", queryset=_gpus_with_busy_flag())))
    state = request.GET.get("state", "")
    if state in GpuNode.State.values:
        nodes = nodes.filter(state=state)
    nodes = list(nodes)
    live_context.attach_readings(nodes, lambda node: node.gpus.all())
    return render(request, "dashboard/node_list.html", {
        "nodes": nodes, "states": GpuNode.State.choices, "selected_state": state,
    })


@login_required
def node_detail(request: HttpRequest, pk: int) -> HttpResponse:
    node = get_object_or_404(GpuNode.objects.visible_to(request.user).select_related("team"), pk=pk)
    live = _live_allocation_of_gpu()
    gpus = list(Gpu.objects.filter(node=node).annotate(
        busy=Exists(live),
        job_id=Subquery(live.values("job_id")[:1]),
        job_name=Subquery(live.values("job__name")[:1]),
        job_team_id=Subquery(live.values("job__team_id")[:1]),
    ).order_by("index"))
    visible_teams = team_ids_of(request.user)
    live_context.attach_readings([node], lambda _node: gpus)
    for gpu in gpus:
        # Another team's job may run on this team's node; its name is not ours to show.
        gpu.job_visible = gpu.busy and (request.user.is_staff or gpu.job_team_id in visible_teams)
    return render(request, "dashboard/node_detail.html", {
        "node": node,
        "gpus": gpus,
        "busy_count": sum(1 for g in gpus if g.busy),
        "can_manage": can_manage_team(request.user, node.team_id),
    })


NODE_ACTIONS = {"drain": GpuNode.State.DRAINING, "activate": GpuNode.State.ACTIVE}


@login_required
@require_POST
def node_set_state(request: HttpRequest, pk: int) -> HttpResponse:
    node = get_object_or_404(GpuNode.objects.visible_to(request.user), pk=pk)
    target = NODE_ACTIONS.get(request.POST.get("action", ""))
    if target is None:
        messages.error(request, "Unknown action.")
        return redirect("node", pk=pk)
    if not can_manage_team(request.user, node.team_id):
        raise PermissionDenied("Only staff or a lead of the node's team can change its state.")
    try:
        cluster_services.set_node_state(node, target)
    except cluster_services.IllegalNodeTransition as exc:
        messages.error(request, str(exc))
    else:
        verb = "draining: running jobs finish, no new ones start" if target == GpuNode.State.DRAINING \
            else "active: the scheduler places jobs on it"
        messages.success(request, f"Node {node.name} is {verb}.")
    return redirect("node", pk=pk)


@login_required
def team_list(request: HttpRequest) -> HttpResponse:
    # Count over all of a team's members, not only the join that visible_to() filters on.
    visible = Team.objects.visible_to(request.user).values("pk")
    teams = list(Team.objects.filter(pk__in=visible).annotate(
        member_count=Count("memberships", distinct=True), node_count=Count("nodes", distinct=True)))
    return render(request, "dashboard/team_list.html", {"rows": _usage_rows(teams)})


@login_required
def team_detail(request: HttpRequest, pk: int) -> HttpResponse:
    team = get_object_or_404(Team.objects.visible_to(request.user), pk=pk)
    nodes = (GpuNode.objects.filter(team=team)
             .prefetch_related(Prefetch("gpus", queryset=_gpus_with_busy_flag())))
    return render(request, "dashboard/team_detail.html", {
        "team": team,
        "usage": _usage_rows([team])[0],
        # "lead" sorts before "member".
        "members": team.memberships.select_related("user").order_by("role", "user__username"),
        "nodes": nodes,
        "recent_jobs": Job.objects.filter(team=team).select_related("team", "submitter")[:RECENT_JOBS],
        "can_manage": can_manage_team(request.user, team),
        "load_charts": team_charts(team),
    })


@login_required
def model_list(request: HttpRequest) -> HttpResponse:
    """The caller's teams' uploaded weights, and a form to upload more: the API's own checks
    (ModelUploadCreateSerializer), so a browser user meets the same rules and messages."""
    teams = list(Team.objects.visible_to(request.user))
    values, errors, status = {"team": str(teams[0].pk) if len(teams) == 1 else ""}, {}, 200
    if request.method == "POST":
        values = {key: request.POST.get(key, "") for key in ("arch", "team", "name")}
        data = {k: v for k, v in values.items() if v != ""}
        if "file" in request.FILES:
            data["file"] = request.FILES["file"]
        serializer = ModelUploadCreateSerializer(data=data, context={"request": request})
        if serializer.is_valid():
            row = store_upload(request.user, serializer.validated_data)
            messages.success(request, f"Uploaded model #{row.pk} “{row.name}” ({row.arch}, {row.tensors} tensors).")
            return redirect("models")
        errors, status = {k: [str(m) for m in v] for k, v in serializer.errors.items()}, 400
    return render(request, "dashboard/model_list.html", {
        "uploads": ModelUpload.objects.visible_to(request.user).select_related("team", "uploaded_by")[:500],
        "teams": teams,
        "archs": COMPRESSION_MODELS,
        "values": values,
        "errors": errors,
    }, status=status)
