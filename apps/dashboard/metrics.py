"""Prometheus `/metrics`: the cluster's state read from the database at scrape time.

Every value is computed when Prometheus asks, by a handful of aggregate queries (GROUP BY in the
database, never a Python loop over jobs), so there is no in-process state to drift from the truth
and nothing to keep in sync between web processes. The scheduler's pass times are the exception:
passes run in Celery workers, so they are recorded in Redis (apps/scheduling/pass_stats.py) and read
from there.

Not public: it reveals every team's load. A request is served when it carries
`Authorization: Bearer <DEEPOPT_METRICS_TOKEN>` or comes from an address in DEEPOPT_METRICS_ALLOW;
a wrong bearer token is a 401, anything else a 403. REMOTE_ADDR is the peer's address: behind a
reverse proxy that is the proxy, so there use the token (X-Forwarded-For is deliberately not trusted).
"""
from __future__ import annotations

import functools
import hmac
import ipaddress
import logging
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db.models import Count, Min, Sum
from django.http import HttpRequest, HttpResponse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_http_methods
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from apps.accounts.models import Team
from apps.cluster.models import Gpu, GpuNode
from apps.forecasting.models import Forecast, ScalingDecision
from apps.scheduling import pass_stats
from apps.scheduling.models import Allocation, Job
from apps.scheduling.states import JobState

log = logging.getLogger(__name__)

FORECAST_SERIES = "cluster:all:allocated_gpus"
FORECAST_HORIZONS: dict[str, timedelta] = {
    "10m": timedelta(minutes=10), "1h": timedelta(hours=1), "6h": timedelta(hours=6),
}
# The forecaster's track-record labels (its record_horizons option) -> this exporter's horizon label.
RECORD_LABELS = {"10min": "10m", "1h": "1h", "6h": "6h"}
NodeState = GpuNode.State


def _gauge(name: str, doc: str, labels: Iterable[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


class DeepOptCollector(Collector):
    """Reads the database (and the pass stats in Redis) each time the registry is collected."""

    def describe(self) -> Iterator[Metric]:
        # The families without samples: lets the registry check names without touching the database,
        # and is the list the Grafana dashboard test checks its queries against.
        yield from self._families().values()

    def collect(self) -> Iterator[Metric]:
        families = self._families()
        now = timezone.now()
        teams = {pk: (slug, max_gpus)
                 for pk, slug, max_gpus in Team.objects.order_by().values_list("id", "slug", "max_gpus")}
        self._jobs(families, teams, now)
        self._gpus(families, teams)
        self._scheduler(families)
        self._forecast(families, now)
        scaling = dict(ScalingDecision.objects.order_by().values_list("action").annotate(n=Count("id")))
        for action in ScalingDecision.Action.values:
            families["scaling"].add_metric([action], scaling.get(action, 0))
        yield from families.values()

    @staticmethod
    def _families() -> dict[str, Metric]:
        return {
            "jobs": _gauge("deepopt_jobs", "Jobs by state and team.", ["team", "state"]),
            "queue_length": _gauge("deepopt_queue_length", "Queued jobs, cluster-wide."),
            "queue_demand": _gauge("deepopt_queue_gpu_demand", "GPUs asked for by queued jobs, cluster-wide."),
            "queue_wait": _gauge("deepopt_queue_oldest_wait_seconds",
                                 "How long the oldest queued job has waited (0 when the queue is empty)."),
            "team_queue_length": _gauge("deepopt_team_queue_length", "Queued jobs of a team.", ["team"]),
            "team_queue_demand": _gauge("deepopt_team_queue_gpu_demand", "GPUs asked for by a team's queued jobs.",
                                        ["team"]),
            "gpus_total": _gauge("deepopt_gpus_total", "GPUs registered (CPU slots of CPU nodes count as GPUs)."),
            "gpus_allocated": _gauge("deepopt_gpus_allocated", "GPUs held by a job, whatever their node's state."),
            "gpus_idle": _gauge("deepopt_gpus_idle", "Free GPUs on active nodes: what the scheduler can place on."),
            "gpus_unavailable": _gauge("deepopt_gpus_unavailable",
                                       "Free GPUs on nodes that are not active (draining, standby, down)."),
            "node_gpus": _gauge("deepopt_node_gpus", "GPUs by their node's state, allocated or free.",
                                ["node_state", "status"]),
            "team_gpus": _gauge("deepopt_team_gpus_allocated", "GPUs a team's jobs hold.", ["team"]),
            "team_max_gpus": _gauge("deepopt_team_max_gpus", "A team's quota: GPUs it may hold at once.", ["team"]),
            "nodes": _gauge("deepopt_nodes", "Nodes by state.", ["state"]),
            "stats_up": _gauge("deepopt_scheduler_stats_up",
                               "1 when the scheduling-pass stats could be read from Redis, else 0."),
            "pass_seconds": HistogramMetricFamily("deepopt_scheduler_pass_seconds",
                                                  "Wall time of scheduling passes, from the workers that ran them."),
            "last_pass": _gauge("deepopt_scheduler_last_pass_seconds", "Wall time of the latest scheduling pass."),
            "last_policy": _gauge("deepopt_scheduler_last_policy_seconds",
                                  "Time the latest pass spent in the policy core (schedule and ETAs)."),
            "last_placed": _gauge("deepopt_scheduler_last_pass_placed_jobs", "Jobs the latest pass placed."),
            "last_queued": _gauge("deepopt_scheduler_last_pass_queued_jobs", "Jobs left queued by the latest pass."),
            "last_ts": _gauge("deepopt_scheduler_last_pass_timestamp_seconds",
                              "Unix time of the latest pass: a stalled scheduler shows here."),
            "placed_total": CounterMetricFamily("deepopt_scheduler_placed_jobs", "Jobs placed by passes.", labels=[]),
            "forecast": _gauge("deepopt_forecast_allocated_gpus",
                               "Latest forecast of the cluster's allocated GPUs at a horizon from its origin.",
                               ["horizon"]),
            "forecast_lower": _gauge("deepopt_forecast_allocated_gpus_lower",
                                     "Lower edge of the forecast's 80% band.", ["horizon"]),
            "forecast_upper": _gauge("deepopt_forecast_allocated_gpus_upper",
                                     "Upper edge of the forecast's 80% band.", ["horizon"]),
            "forecast_age": _gauge("deepopt_forecast_age_seconds", "Seconds since the latest forecast's origin."),
            "forecast_ratio": _gauge("deepopt_forecast_mae_ratio",
                                     "The forecasts' MAE over persistence's, on the targets of the last days.",
                                     ["horizon"]),
            "forecast_coverage": _gauge("deepopt_forecast_band_coverage",
                                        "Share of the last days' targets inside the forecasts' 80% band.", ["horizon"]),
            "scaling": CounterMetricFamily("deepopt_scaling_decisions", "Autoscaler decisions by action.",
                                           labels=["action"]),
        }

    @staticmethod
    def _jobs(families: dict[str, Metric], teams: dict, now: datetime) -> None:
        # One pass over the job table serves both the state counts and the queue's demand and age.
        counts, queued = {}, {}
        for team, state, n, gpus, oldest in (Job.objects.order_by().values_list("team_id", "state")
                                             .annotate(n=Count("id"), gpus=Sum("gpus"), oldest=Min("submitted_at"))):
            counts[(team, state)] = n
            if state == JobState.QUEUED:
                queued[team] = (n, gpus or 0, oldest)
        # Every team × state, zeros included, so a graph drops to 0 instead of ending.
        for team_id, (slug, _) in teams.items():
            for state in JobState.values:
                families["jobs"].add_metric([slug, state], counts.get((team_id, state), 0))
        for team_id, (slug, _) in teams.items():
            n, gpus, _ = queued.get(team_id, (0, 0, None))
            families["team_queue_length"].add_metric([slug], n)
            families["team_queue_demand"].add_metric([slug], gpus)
        families["queue_length"].add_metric([], sum(n for n, _, _ in queued.values()))
        families["queue_demand"].add_metric([], sum(g for _, g, _ in queued.values()))
        oldest = min((o for _, _, o in queued.values() if o is not None), default=None)
        families["queue_wait"].add_metric([], max(0.0, (now - oldest).total_seconds()) if oldest else 0.0)

    @staticmethod
    def _gpus(families: dict[str, Metric], teams: dict) -> None:
        total_by_state = dict(Gpu.objects.order_by().values_list("node__state").annotate(n=Count("id")))
        # The unique constraint (one live allocation per GPU) makes a count of live rows a count of GPUs.
        held = list(Allocation.objects.filter(released_at__isnull=True).order_by()
                    .values_list("node__state", "job__team_id").annotate(n=Count("id")))
        held_by_state: dict[str, int] = {}
        held_by_team: dict[int, int] = {}
        for state, team_id, n in held:
            held_by_state[state] = held_by_state.get(state, 0) + n
            held_by_team[team_id] = held_by_team.get(team_id, 0) + n
        for state in NodeState.values:
            allocated = held_by_state.get(state, 0)
            families["node_gpus"].add_metric([state, "allocated"], allocated)
            families["node_gpus"].add_metric([state, "free"], max(0, total_by_state.get(state, 0) - allocated))
        allocated = sum(held_by_state.values())
        idle = max(0, total_by_state.get(NodeState.ACTIVE, 0) - held_by_state.get(NodeState.ACTIVE, 0))
        families["gpus_total"].add_metric([], sum(total_by_state.values()))
        families["gpus_allocated"].add_metric([], allocated)
        families["gpus_idle"].add_metric([], idle)
        families["gpus_unavailable"].add_metric([], max(0, sum(total_by_state.values()) - allocated - idle))
        for team_id, (slug, max_gpus) in teams.items():
            families["team_gpus"].add_metric([slug], held_by_team.get(team_id, 0))
            families["team_max_gpus"].add_metric([slug], max_gpus)
        nodes = dict(GpuNode.objects.order_by().values_list("state").annotate(n=Count("id")))
        for state in NodeState.values:
            families["nodes"].add_metric([state], nodes.get(state, 0))

    @staticmethod
    def _scheduler(families: dict[str, Metric]) -> None:
        stats = pass_stats.read_stats()
        families["stats_up"].add_metric([], 0 if stats is None else 1)
        if stats is None:
            return  # no pass values at all rather than made-up zeros
        families["pass_seconds"].add_metric(
            [], buckets=[("+Inf" if le == float("inf") else f"{le:g}", n) for le, n in stats.buckets],
            sum_value=stats.sum_s,
        )
        families["placed_total"].add_metric([], stats.placed_total)
        for key, value in (("last_pass", stats.last_pass_s), ("last_policy", stats.last_policy_s),
                           ("last_placed", stats.last_placed), ("last_queued", stats.last_queued),
                           ("last_ts", stats.last_timestamp)):
            if value is not None:
                families[key].add_metric([], value)

    @staticmethod
    def _forecast(families: dict[str, Metric], now: datetime) -> None:
        latest = (Forecast.objects.filter(series__key=FORECAST_SERIES).order_by("-origin")
                  .values_list("origin", "step_s", "points", "track_record").first())
        if latest is None:
            return
        origin, step_s, points, record = latest
        for label, scores in (record or {}).items():
            horizon = RECORD_LABELS.get(label)
            if horizon is None:
                continue
            if scores.get("ratio_to_persistence") is not None:
                families["forecast_ratio"].add_metric([horizon], scores["ratio_to_persistence"])
            families["forecast_coverage"].add_metric([horizon], scores["coverage"])
        families["forecast_age"].add_metric([], max(0.0, (now - origin).total_seconds()))
        for horizon, delta in FORECAST_HORIZONS.items():
            point = _point_at(points, origin + delta, timedelta(seconds=step_s or 0))
            if point is None:
                continue  # the forecast does not reach this far
            _, yhat, lower, upper = point[:4]
            families["forecast"].add_metric([horizon], yhat)
            families["forecast_lower"].add_metric([horizon], lower)
            families["forecast_upper"].add_metric([horizon], upper)


def _point_at(points: list, target: datetime, step: timedelta) -> list | None:
    """The first point at or after `target`, if it is less than one step past it."""
    for point in points or ():
        try:
            when = datetime.fromisoformat(point[0])
        except (TypeError, ValueError, IndexError):
            log.warning("Skipping a malformed forecast point: %r", point)
            continue
        if timezone.is_naive(when):
            when = timezone.make_aware(when, UTC)
        if when >= target:
            return point if when - target < max(step, timedelta(seconds=1)) else None
    return None


REGISTRY = CollectorRegistry(auto_describe=False)
REGISTRY.register(DeepOptCollector())


# --- access ---------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def allowed_networks(entries: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    networks = []
    for entry in (e.strip() for e in entries):
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry))
        except ValueError as exc:
            raise ImproperlyConfigured(
                f"DEEPOPT_METRICS_ALLOW: {entry!r} is not an IP address or network ({exc}); "
                "use e.g. 127.0.0.1,::1,10.0.0.0/8."
            ) from exc
    return tuple(networks)


def address_allowed(address: str, entries: Iterable[str]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False  # no address (a unix socket) or garbage: never allowed
    candidates = [ip]
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        candidates.append(ip.ipv4_mapped)  # a dual-stack server reports 127.0.0.1 as ::ffff:127.0.0.1
    return any(c in net for net in allowed_networks(tuple(entries)) for c in candidates if c.version == net.version)


def _bearer(request: HttpRequest) -> str | None:
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" else None


def _refuse(status: int, message: str) -> HttpResponse:
    response = HttpResponse(message + "\n", status=status, content_type="text/plain; charset=utf-8")
    if status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="deepopt-metrics"'
    return response


@never_cache
@require_http_methods(["GET", "HEAD"])
def metrics_view(request: HttpRequest) -> HttpResponse:
    token = _bearer(request)
    if token is not None:
        expected = settings.DEEPOPT_METRICS_TOKEN
        if not expected or not hmac.compare_digest(token.encode(), expected.encode()):
            return _refuse(401, "Wrong metrics token.")
    elif not address_allowed(request.META.get("REMOTE_ADDR", ""), settings.DEEPOPT_METRICS_ALLOW):
        return _refuse(403, "Metrics need a bearer token (DEEPOPT_METRICS_TOKEN) or an allowed address "
                            "(DEEPOPT_METRICS_ALLOW).")
    return HttpResponse(generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST)
