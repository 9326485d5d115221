"""Prometheus /metrics: who may read it, what it says about a known cluster, the pass timings kept in
Redis, and the Grafana dashboard's queries against the names the collector exports."""
from __future__ import annotations

import json
import re
from datetime import timedelta
from pathlib import Path

import pytest
import redis
import yaml
from django.core.exceptions import ImproperlyConfigured
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from apps.cluster.models import GpuNode
from apps.cluster.services import register_node, set_node_state
from apps.dashboard.metrics import DeepOptCollector
from apps.forecasting.models import Forecast, ScalingDecision, Series
from apps.scheduling import pass_stats
from apps.scheduling.live import run_pass
from tests.conftest import COMPRESSION_JOB

ROOT = Path(__file__).resolve().parents[2]
REDIS_DB11 = "redis://127.0.0.1:6379/11"
UNREACHABLE_REDIS = "redis://127.0.0.1:1/0"  # port 1: refused at once
TOKEN = "metrics-test-token-0123456789"  # noqa: S105 - a test value


def scrape(client: Client | None = None, **extra) -> dict[tuple[str, frozenset], float]:
    response = (client or Client()).get("/metrics", **extra)
    assert response.status_code == 200, response.content
    assert response["Content-Type"] == CONTENT_TYPE_LATEST
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.content.decode())
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels) -> float:
    return samples[(name, frozenset(labels.items()))]


def names(samples: dict) -> set[str]:
    return {name for name, _ in samples}


def submit(client, team, gpus: int, name: str = "job") -> int:
    payload = {**COMPRESSION_JOB, "name": name, "team": team.pk, "resources": {"gpus": gpus}}
    response = client.post("/api/v1/jobs/", payload, format="json")
    assert response.status_code == 201, response.content
    return response.json()["id"]


def redis_db11() -> redis.Redis:
    client = redis.Redis.from_url(REDIS_DB11, socket_connect_timeout=0.5)
    try:
        client.ping()
    except redis.RedisError:
        pytest.skip("Redis does not answer on 127.0.0.1:6379; the pass-stats tests need it (db 11)")
    return client


@pytest.fixture
def stats_in_db11(settings):
    client = redis_db11()
    settings.REDIS_URL = REDIS_DB11
    settings.DEEPOPT_PASS_STATS = True
    pass_stats.reset()
    yield client
    pass_stats.reset()


@pytest.fixture
def no_redis(settings):
    settings.REDIS_URL = UNREACHABLE_REDIS
    settings.DEEPOPT_PASS_STATS = True
    pass_stats.reset()
    yield
    pass_stats.reset()


# --- access ----------------------------------------------------------------------------------------

@pytest.fixture
def token(settings):
    settings.DEEPOPT_METRICS_TOKEN = TOKEN
    settings.DEEPOPT_METRICS_ALLOW = ["127.0.0.1", "::1"]
    return TOKEN


@pytest.mark.django_db
def test_a_foreign_address_without_a_token_is_refused(token):
    response = Client().get("/metrics", REMOTE_ADDR="203.0.113.9")
    assert response.status_code == 403
    assert b"deepopt_" not in response.content


@pytest.mark.django_db
@pytest.mark.parametrize("address", ["203.0.113.9", "127.0.0.1"])
def test_a_wrong_token_is_refused_from_anywhere(token, address):
    response = Client().get("/metrics", REMOTE_ADDR=address, headers={"Authorization": "Bearer not-the-token"})
    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert b"deepopt_" not in response.content


@pytest.mark.django_db
def test_no_bearer_token_works_when_none_is_configured(settings):
    settings.DEEPOPT_METRICS_TOKEN = ""
    response = Client().get("/metrics", REMOTE_ADDR="203.0.113.9", headers={"Authorization": "Bearer "})
    assert response.status_code == 401


@pytest.mark.django_db
def test_the_right_token_is_served_from_a_foreign_address(token, no_redis):
    samples = scrape(REMOTE_ADDR="203.0.113.9", headers={"Authorization": f"Bearer {token}"})
    assert "deepopt_queue_length" in names(samples)


@pytest.mark.django_db
@pytest.mark.parametrize(("allow", "address"), [
    (["127.0.0.1", "::1"], "127.0.0.1"),
    (["127.0.0.1", "::1"], "::1"),
    (["127.0.0.1"], "::ffff:127.0.0.1"),  # a dual-stack server's view of IPv4 loopback
    (["10.0.0.0/8"], "10.20.30.40"),
    (["fd00::/8"], "fd00::17"),
])
def test_an_allowed_address_is_served_without_a_token(settings, no_redis, allow, address):
    settings.DEEPOPT_METRICS_ALLOW = allow
    assert "deepopt_gpus_total" in names(scrape(REMOTE_ADDR=address))


@pytest.mark.django_db
@pytest.mark.parametrize(("allow", "address"), [
    (["10.0.0.0/8"], "11.0.0.1"),
    (["127.0.0.1"], "::1"),
    ([], "127.0.0.1"),
    (["127.0.0.1"], ""),
])
def test_an_address_outside_the_allow_list_is_refused(settings, allow, address):
    settings.DEEPOPT_METRICS_TOKEN = TOKEN
    settings.DEEPOPT_METRICS_ALLOW = allow
    assert Client().get("/metrics", REMOTE_ADDR=address).status_code == 403


@pytest.mark.django_db
def test_a_bad_allow_entry_is_a_clear_error(settings):
    settings.DEEPOPT_METRICS_ALLOW = ["127.0.0.1", "10.0.0.1/8"]
    with pytest.raises(ImproperlyConfigured, match=r"DEEPOPT_METRICS_ALLOW: '10.0.0.1/8'"):
        Client(raise_request_exception=True).get("/metrics", REMOTE_ADDR="203.0.113.9")


@pytest.mark.django_db
def test_it_only_answers_get(token):
    response = Client().post("/metrics", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 405


# --- values ----------------------------------------------------------------------------------------

@pytest.mark.django_db
def test_queue_demand_and_gpus_follow_a_pass_and_a_drain(alice, charlie, team_a, team_b, node_a, client_for,
                                                        stats_in_db11):
    first, second = submit(client_for(alice), team_a, 3, "a1"), submit(client_for(alice), team_a, 3, "a2")
    before = scrape()
    assert value(before, "deepopt_queue_length") == 2
    assert value(before, "deepopt_queue_gpu_demand") == 6
    assert value(before, "deepopt_team_queue_gpu_demand", team="team-a") == 6
    assert value(before, "deepopt_team_queue_gpu_demand", team="team-b") == 0
    assert value(before, "deepopt_jobs", team="team-a", state="queued") == 2
    assert value(before, "deepopt_jobs", team="team-b", state="queued") == 0
    assert value(before, "deepopt_queue_oldest_wait_seconds") >= 0
    assert value(before, "deepopt_gpus_total") == 8
    assert value(before, "deepopt_gpus_allocated") == 0
    assert value(before, "deepopt_gpus_idle") == 8
    assert value(before, "deepopt_nodes", state="active") == 1

    assert sorted(run_pass().placed) == sorted([first, second])
    after = scrape()
    assert value(after, "deepopt_queue_length") == 0
    assert value(after, "deepopt_queue_gpu_demand") == 0
    assert value(after, "deepopt_queue_oldest_wait_seconds") == 0
    assert value(after, "deepopt_jobs", team="team-a", state="queued") == 0
    assert value(after, "deepopt_jobs", team="team-a", state="allocated") == 2
    assert value(after, "deepopt_gpus_allocated") == 6
    assert value(after, "deepopt_gpus_idle") == 2
    assert value(after, "deepopt_gpus_unavailable") == 0
    assert value(after, "deepopt_team_gpus_allocated", team="team-a") == 6
    assert value(after, "deepopt_team_gpus_allocated", team="team-b") == 0
    assert value(after, "deepopt_team_max_gpus", team="team-b") == 4
    assert value(after, "deepopt_node_gpus", node_state="active", status="allocated") == 6
    assert value(after, "deepopt_scheduler_pass_seconds_count") == 1
    assert value(after, "deepopt_scheduler_last_pass_placed_jobs") == 2

    # Draining the node: its jobs keep their GPUs, its two free GPUs are no longer idle but unavailable;
    # a new active node's GPUs are idle.
    set_node_state(node_a, GpuNode.State.DRAINING)
    register_node(team=team_b, name="b-node-1", hostname="b1.example",
                  gpus=[{"index": i, "model": "NVIDIA H200", "memory_mb": 143_771} for i in range(4)])
    submit(client_for(charlie), team_b, 4, "b1")
    drained = scrape()
    assert value(drained, "deepopt_gpus_total") == 12
    assert value(drained, "deepopt_gpus_allocated") == 6
    assert value(drained, "deepopt_gpus_idle") == 4
    assert value(drained, "deepopt_gpus_unavailable") == 2
    assert value(drained, "deepopt_node_gpus", node_state="draining", status="allocated") == 6
    assert value(drained, "deepopt_node_gpus", node_state="draining", status="free") == 2
    assert value(drained, "deepopt_node_gpus", node_state="active", status="free") == 4
    assert value(drained, "deepopt_nodes", state="draining") == 1
    assert value(drained, "deepopt_nodes", state="active") == 1
    assert value(drained, "deepopt_team_queue_length", team="team-b") == 1
    assert value(drained, "deepopt_queue_gpu_demand") == 4


@pytest.mark.django_db
def test_the_scrape_costs_the_same_queries_whatever_the_number_of_jobs_and_teams(
        alice, team_a, node_a, client_for, no_redis):
    submit(client_for(alice), team_a, 1)
    scrape()  # warm: the first request may load content types and the like
    with CaptureQueriesContext(connection) as small:
        scrape()
    client = client_for(alice)
    for i in range(15):
        submit(client, team_a, 1 + i % 3, f"more-{i}")
    from apps.accounts.models import Team

    for i in range(5):
        team = Team.objects.create(name=f"Extra {i}")
        register_node(team=team, name=f"extra-{i}", hostname=f"x{i}.example",
                      gpus=[{"index": 0, "model": "NVIDIA H200", "memory_mb": 143_771}])
    run_pass()
    with CaptureQueriesContext(connection) as big:
        samples = scrape()
    assert len(big) == len(small) <= 7, [q["sql"] for q in big.captured_queries]
    assert value(samples, "deepopt_gpus_total") == 13
    assert {dict(labels)["team"] for name, labels in samples if name == "deepopt_team_queue_length"} == {
        "team-a", *(f"extra-{i}" for i in range(5))}


# --- scheduler pass timings in Redis ---------------------------------------------------------------

@pytest.mark.django_db
def test_passes_are_recorded_in_redis_and_exported_as_a_histogram(alice, team_a, node_a, client_for, stats_in_db11):
    submit(client_for(alice), team_a, 2)
    results = [run_pass(), run_pass(), run_pass()]
    raw = stats_in_db11.hgetall(pass_stats.KEY)
    assert int(raw[b"count"]) == 3
    assert float(raw[b"last_placed"]) == 0  # the job was placed by the first pass
    samples = scrape()
    assert value(samples, "deepopt_scheduler_stats_up") == 1
    assert value(samples, "deepopt_scheduler_pass_seconds_count") == 3
    assert value(samples, "deepopt_scheduler_pass_seconds_bucket", le="+Inf") == 3
    recorded_sum = value(samples, "deepopt_scheduler_pass_seconds_sum")
    measured_sum = sum(r.pass_ms for r in results) / 1000
    assert 0 < recorded_sum <= measured_sum * 1.01 + 0.005
    buckets = sorted((float(dict(labels)["le"]), v) for (name, labels), v in samples.items()
                     if name == "deepopt_scheduler_pass_seconds_bucket")
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative
    slowest = max(r.pass_ms for r in results) / 1000
    assert all(v == 3 for le, v in buckets if le >= slowest)
    assert value(samples, "deepopt_scheduler_placed_jobs_total") == 1
    assert value(samples, "deepopt_scheduler_last_pass_seconds") > 0
    assert value(samples, "deepopt_scheduler_last_policy_seconds") >= 0
    assert value(samples, "deepopt_scheduler_last_pass_queued_jobs") == 0
    assert abs(value(samples, "deepopt_scheduler_last_pass_timestamp_seconds") - timezone.now().timestamp()) < 60


@pytest.mark.django_db
def test_a_pass_never_fails_when_redis_is_unreachable(alice, team_a, node_a, client_for, no_redis, caplog):
    job = submit(client_for(alice), team_a, 1)
    assert run_pass().placed == [job]
    assert "Could not record scheduling-pass stats" in caplog.text
    assert run_pass().placed == []  # within the backoff: no second attempt, no second warning
    assert caplog.text.count("Could not record") == 1
    samples = scrape()
    assert value(samples, "deepopt_scheduler_stats_up") == 0
    assert "deepopt_scheduler_pass_seconds_count" not in names(samples)
    assert value(samples, "deepopt_gpus_allocated") == 1  # the database's metrics are all there


# --- forecast and autoscaler -----------------------------------------------------------------------

@pytest.mark.django_db
def test_the_latest_forecast_is_exported_at_three_horizons(no_redis):
    series = Series.objects.create(key="cluster:all:allocated_gpus", scope="cluster", metric="allocated_gpus")
    now = timezone.now().replace(microsecond=0)
    origin = now - timedelta(minutes=5)

    def path(level: float) -> list:
        return [[(origin + timedelta(minutes=10 * k)).isoformat(), level + k, level + k - 2, level + k + 3]
                for k in range(1, 37)]

    Forecast.objects.create(series=series, origin=origin - timedelta(hours=1), step_s=600, method="old",
                            points=path(100))
    record = {"10min": {"scored": 300, "mae": 4.5, "mae_persistence": 5.3, "ratio_to_persistence": 0.849,
                        "coverage": 0.796},
              "6h": {"scored": 300, "mae": 0.0, "mae_persistence": 0.0, "ratio_to_persistence": None,
                     "coverage": 1.0},
              "3h": {"scored": 300, "mae": 1.0, "mae_persistence": 1.0, "ratio_to_persistence": 1.0,
                     "coverage": 0.8}}  # a horizon the exporter does not name: left out
    Forecast.objects.create(series=series, origin=origin, step_s=600, method="prophet", points=path(10),
                            track_record=record)
    samples = scrape()
    assert value(samples, "deepopt_forecast_mae_ratio", horizon="10m") == 0.849
    assert value(samples, "deepopt_forecast_band_coverage", horizon="10m") == 0.796
    assert value(samples, "deepopt_forecast_band_coverage", horizon="6h") == 1.0
    ratios = {dict(labels)["horizon"] for name, labels in samples if name == "deepopt_forecast_mae_ratio"}
    assert ratios == {"10m"}   # no ratio where persistence never erred; none for 3h
    assert value(samples, "deepopt_forecast_allocated_gpus", horizon="10m") == 11
    assert value(samples, "deepopt_forecast_allocated_gpus", horizon="1h") == 16
    assert value(samples, "deepopt_forecast_allocated_gpus", horizon="6h") == 46
    assert value(samples, "deepopt_forecast_allocated_gpus_lower", horizon="1h") == 14
    assert value(samples, "deepopt_forecast_allocated_gpus_upper", horizon="1h") == 19
    assert 295 <= value(samples, "deepopt_forecast_age_seconds") < 360


@pytest.mark.django_db
def test_a_short_forecast_leaves_out_the_horizons_it_does_not_reach(no_redis):
    series = Series.objects.create(key="cluster:all:allocated_gpus", scope="cluster", metric="allocated_gpus")
    origin = timezone.now()
    points = [[(origin + timedelta(minutes=10 * k)).isoformat(), 5.0, 4.0, 6.0] for k in range(1, 7)]
    Forecast.objects.create(series=series, origin=origin, step_s=600, method="prophet", points=points)
    samples = scrape()
    horizons = {dict(labels)["horizon"] for name, labels in samples if name == "deepopt_forecast_allocated_gpus"}
    assert horizons == {"10m", "1h"}


@pytest.mark.django_db
def test_no_forecast_means_no_forecast_metrics(no_redis):
    other = Series.objects.create(key="team:a:allocated_gpus", scope="team", metric="allocated_gpus")
    Forecast.objects.create(series=other, origin=timezone.now(), step_s=600, method="prophet",
                            points=[[timezone.now().isoformat(), 1, 0, 2]])
    assert not any(n.startswith("deepopt_forecast") for n in names(scrape()))


@pytest.mark.django_db
def test_scaling_decisions_are_counted_by_action(node_a, no_redis):
    for action in ("standby", "standby", "activate"):
        ScalingDecision.objects.create(action=action, node=node_a, node_name=node_a.name, reason="test",
                                       forecast_peak=1.0, active_capacity=8)
    samples = scrape()
    assert value(samples, "deepopt_scaling_decisions_total", action="standby") == 2
    assert value(samples, "deepopt_scaling_decisions_total", action="activate") == 1


# --- Grafana, Prometheus and compose files ---------------------------------------------------------

SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


def exported_sample_names() -> dict[str, str]:
    """Sample name → its family's name, for every family the collector can export."""
    return {family.name + suffix: family.name for family in DeepOptCollector().describe()
            for suffix in SUFFIXES[family.type]}


def dashboard_exprs() -> list[tuple[str, str]]:
    dashboard = json.loads((ROOT / "docker/grafana/dashboards/deepopt.json").read_text())
    panels = []
    stack = list(dashboard["panels"])
    while stack:
        panel = stack.pop()
        stack.extend(panel.get("panels", []))  # panels folded into a row
        panels.append(panel)
    return [(panel.get("title", ""), target["expr"]) for panel in panels for target in panel.get("targets", [])]


@pytest.mark.django_db
def test_every_dashboard_query_uses_only_exported_metrics_and_every_metric_is_shown(
        alice, team_a, node_a, client_for, stats_in_db11):
    exported = exported_sample_names()
    exprs = dashboard_exprs()
    assert exprs
    shown = set()
    for title, expr in exprs:
        used = set(re.findall(r"\bdeepopt_[a-zA-Z0-9_]+", expr))
        assert used, f"panel {title!r}: {expr!r} names no deepopt metric"
        unknown = used - set(exported)
        assert not unknown, f"panel {title!r} queries {unknown}, which /metrics does not export"
        shown |= {exported[name] for name in used}
    assert shown == set(exported.values()), f"no panel shows {set(exported.values()) - shown}"

    # And describe() is the truth: a scrape with every kind of data exports exactly those names.
    submit(client_for(alice), team_a, 1)
    run_pass()
    series = Series.objects.create(key="cluster:all:allocated_gpus", scope="cluster", metric="allocated_gpus")
    origin = timezone.now()
    Forecast.objects.create(series=series, origin=origin, step_s=600, method="prophet",
                            points=[[(origin + timedelta(minutes=10 * k)).isoformat(), 1, 0, 2] for k in range(1, 37)],
                            track_record={"1h": {"scored": 10, "mae": 1.0, "mae_persistence": 2.0,
                                                 "ratio_to_persistence": 0.5, "coverage": 0.8}})
    assert names(scrape()) == set(exported)


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard_folder():
    datasources = yaml.safe_load((ROOT / "docker/grafana/provisioning/datasources/prometheus.yaml").read_text())
    source = datasources["datasources"][0]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    dashboard = json.loads((ROOT / "docker/grafana/dashboards/deepopt.json").read_text())
    uids = {target.get("datasource", {}).get("uid") for panel in dashboard["panels"]
            for target in panel.get("targets", [])}
    assert uids == {source["uid"]}
    providers = yaml.safe_load((ROOT / "docker/grafana/provisioning/dashboards/deepopt.yaml").read_text())
    assert providers["providers"][0]["options"]["path"] == "/etc/grafana/dashboards/deepopt"


def test_prometheus_scrapes_the_web_app_with_the_token_file():
    config = yaml.safe_load((ROOT / "docker/prometheus/prometheus.yml").read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "deepopt")
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["web:8000"]
    assert job["authorization"] == {"type": "Bearer", "credentials_file": "/run/secrets/metrics_token"}


def test_compose_runs_prometheus_and_grafana_with_pinned_images_and_health_checks():
    compose = yaml.safe_load((ROOT / "docker/compose.yaml").read_text())
    for name in ("prometheus", "grafana"):
        service = compose["services"][name]
        image = service["image"]
        assert ":" in image, image
        assert not image.endswith(":latest"), image
        assert service["healthcheck"]["test"]
    assert "metrics_token" in compose["secrets"]
    assert "GF_SECURITY_ADMIN_PASSWORD" in compose["services"]["grafana"]["environment"]
    assert "${GRAFANA_ADMIN_PASSWORD" in compose["services"]["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    assert {"prometheus-data", "grafana-data"} <= set(compose["volumes"])
