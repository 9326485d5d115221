"""A real Prometheus scrapes the web app's /metrics, and every query of the Grafana dashboard runs on it.

compose.yaml cannot be started here (no Docker engine, no image registry), so this test runs the part
of it that can be checked without one: Debian's Prometheus (`apt-get install prometheus`; .ci/run
installs it) loads `docker/prometheus/prometheus.yml`, changed only where compose's network and secret
live (the target and the token file), and scrapes pytest-django's live server with the bearer token.
A second job with a wrong token must be refused (401), so the passing scrape shows that the token
travels. Then each expression of `docker/grafana/dashboards/deepopt.json`, with `$team` as Grafana's
"All", is evaluated by Prometheus's own engine: it must parse, and, with its `offset` removed (no data
is an hour old yet), return series. That catches what the static checks in tests/unit/test_metrics.py
cannot: a label or a label value that no series has, a wrong aggregation, a PromQL syntax error.

Debian 12 ships Prometheus 2.42; compose pins prom/prometheus v3.1.0. The configuration keys used
(`authorization.credentials_file`, `follow_redirects`) and the dashboard's PromQL mean the same in both.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlencode, urlsplit
from urllib.request import urlopen

import pytest
import yaml
from django.utils import timezone

from apps.forecasting.models import Forecast, ScalingDecision, Series
from apps.scheduling import pass_stats
from apps.scheduling.live import run_pass
from apps.scheduling.models import Allocation
from tests.conftest import COMPRESSION_JOB
from tests.net import free_port
from tests.unit.test_metrics import REDIS_DB11, dashboard_exprs, redis_db11

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_YML = ROOT / "docker" / "prometheus" / "prometheus.yml"
TOKEN = "prometheus-integration-token-0123456789"  # noqa: S105 - a test value
WRONG_TOKEN = "not-the-token"  # noqa: S105 - a test value
DEADLINE_S = 60


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (apt-get install prometheus; .ci/run installs it).")
    return path


class Prometheus:
    def __init__(self, config: Path, data: Path, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.process = subprocess.Popen(
            [binary("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={data}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=log.open("wb"), stderr=subprocess.STDOUT,
        )

    def get(self, path: str, **params) -> dict:
        with urlopen(f"{self.url}{path}?{urlencode(params, doseq=True)}", timeout=10) as response:  # noqa: S310
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list:
        return self.get("/api/v1/query", query=expr)["result"]

    def wait(self, what: str, check) -> object:
        deadline = time.monotonic() + DEADLINE_S
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"prometheus exited ({self.process.returncode}): {self.log.read_text()[-2000:]}")
            try:
                result = check()
            except OSError:
                result = None
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} within {DEADLINE_S} s; prometheus log: {self.log.read_text()[-2000:]}")
            time.sleep(0.25)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def local_config(target: str, token_file: Path, wrong_token_file: Path, self_port: int) -> dict:
    """The repository's prometheus.yml with compose's network and secret swapped for this test's, a
    one-second scrape interval, and a second job that sends a wrong token."""
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    deepopt = jobs["deepopt"]
    assert deepopt["static_configs"] == [{"targets": ["web:8000"]}]
    assert deepopt["authorization"] == {"type": "Bearer", "credentials_file": "/run/secrets/metrics_token"}
    deepopt["static_configs"] = [{"targets": [target]}]
    deepopt["authorization"]["credentials_file"] = str(token_file)
    jobs["prometheus"]["static_configs"] = [{"targets": [f"127.0.0.1:{self_port}"]}]
    # The alerting rules, which the repository's file names relative to itself.
    assert config["rule_files"] == ["alerts.yml"]
    config["rule_files"] = [str(PROMETHEUS_YML.parent / "alerts.yml")]
    wrong = json.loads(json.dumps(deepopt))
    wrong["job_name"] = "deepopt-wrong-token"
    wrong["authorization"]["credentials_file"] = str(wrong_token_file)
    config["scrape_configs"].append(wrong)
    return config


@pytest.fixture
def cluster(settings, alice, team_a, team_b, node_a, node_b, client_for) -> dict:
    """A cluster with something in every metric: placed and queued jobs of two teams, pass timings in
    Redis, a forecast and a scaling decision."""
    redis_db11()   # skips, saying why, when Redis does not answer
    settings.REDIS_URL = REDIS_DB11
    settings.DEEPOPT_PASS_STATS = True
    settings.DEEPOPT_METRICS_TOKEN = TOKEN
    settings.DEEPOPT_METRICS_ALLOW = ()  # the token, not the loopback address, must be what lets it in
    pass_stats.reset()

    client = client_for(alice)
    for name, gpus in (("small", 2), ("medium", 4), ("too big", 8)):
        response = client.post("/api/v1/jobs/", {**COMPRESSION_JOB, "name": name, "team": team_a.pk,
                                                 "resources": {"gpus": gpus}}, format="json")
        assert response.status_code == 201, response.content
    placed = run_pass().placed
    assert len(placed) == 2  # 2 + 4 of team-a's 8 GPUs; the 8-GPU job waits

    series = Series.objects.create(key="cluster:all:allocated_gpus", scope="cluster", metric="allocated_gpus")
    origin = timezone.now()
    Forecast.objects.create(series=series, origin=origin, step_s=600, method="prophet",
                            points=[[(origin + timedelta(minutes=10 * k)).isoformat(), 6 + k / 10, 5, 8]
                                    for k in range(1, 37)],
                            track_record={h: {"scored": 100, "mae": 1.0, "mae_persistence": 1.25,
                                              "ratio_to_persistence": 0.8, "coverage": 0.79}
                                          for h in ("10min", "1h", "6h")})
    ScalingDecision.objects.create(action="standby", node=node_b, node_name=node_b.name, reason="test",
                                   forecast_peak=6.0, active_capacity=12)
    yield {"allocated": Allocation.objects.filter(released_at__isnull=True).count(),
           "teams": {team_a.slug, team_b.slug}}
    pass_stats.reset()


@pytest.fixture
def prometheus(tmp_path, live_server, cluster) -> Iterator[Prometheus]:
    binary("prometheus")
    token_file, wrong_file = tmp_path / "metrics_token", tmp_path / "wrong_token"
    token_file.write_text(TOKEN + "\n")  # compose's secret file ends with a newline; Prometheus trims it
    wrong_file.write_text(WRONG_TOKEN)
    config_file = tmp_path / "prometheus.yml"
    self_port = free_port()
    config = local_config(urlsplit(live_server.url).netloc, token_file, wrong_file, self_port)
    config_file.write_text(yaml.safe_dump(config))
    check = subprocess.run([binary("promtool"), "check", "config", str(config_file)],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr

    server = Prometheus(config_file, tmp_path / "data", tmp_path / "prometheus.log")
    try:
        yield server
    finally:
        server.stop()


def targets_by_job(server: Prometheus) -> dict[str, dict]:
    return {t["labels"]["job"]: t for t in server.get("/api/v1/targets")["activeTargets"]}


def test_prometheus_scrapes_with_the_token_and_every_dashboard_query_returns_series(prometheus, cluster):
    # The right token is let in, the wrong one is refused: the token is what decides.
    targets = prometheus.wait("the deepopt target up and the wrong-token one refused", lambda: (
        (t := targets_by_job(prometheus)).get("deepopt", {}).get("health") == "up"
        and t.get("deepopt-wrong-token", {}).get("health") == "down" and t))
    assert "401" in targets["deepopt-wrong-token"]["lastError"], targets["deepopt-wrong-token"]
    assert targets["deepopt"]["lastError"] == ""

    # Enough scrapes for rate(), delta() and increase() to have two points.
    prometheus.wait("four scrapes of the web app",
                    lambda: prometheus.query('count_over_time(up{job="deepopt"}[1m]) >= 4'))
    # The numbers are the database's.
    assert float(prometheus.query("deepopt_gpus_allocated")[0]["value"][1]) == cluster["allocated"] == 6
    assert float(prometheus.query("deepopt_queue_gpu_demand")[0]["value"][1]) == 8
    assert float(prometheus.query('deepopt_forecast_allocated_gpus{horizon="1h"}')[0]["value"][1]) == 6.6
    assert float(prometheus.query("deepopt_scheduler_pass_seconds_count")[0]["value"][1]) == 1
    assert float(prometheus.query('deepopt_forecast_mae_ratio{horizon="6h"}')[0]["value"][1]) == 0.8

    # The dashboard's variable: label_values(deepopt_jobs, team).
    teams = prometheus.get("/api/v1/label/team/values", **{"match[]": "deepopt_jobs"})
    assert set(teams) == cluster["teams"]

    # The alerting rules are loaded, and on this healthy cluster none is pending or firing.
    rules = [rule["name"] for group in prometheus.get("/api/v1/rules")["groups"] for rule in group["rules"]]
    assert len(rules) == 8
    assert "DeepOptSchedulerStalled" in rules
    assert prometheus.get("/api/v1/alerts")["alerts"] == []

    # A label value no series has gives no series, so the check below has teeth.
    assert prometheus.query('deepopt_forecast_allocated_gpus{horizon="10min"}') == []
    exprs = dashboard_exprs()
    assert len(exprs) > 30
    for title, expr in exprs:
        expr = expr.replace("$team", ".*")  # the variable's allValue, as Grafana sends "All"
        assert "$" not in expr, f"panel {title!r}: a variable this test does not know: {expr}"
        prometheus.query(expr)  # parses and evaluates (a 400 from the API raises)
        now = re.sub(r"\s+offset\s+\w+", "", expr)
        assert prometheus.query(now), f"panel {title!r}: {now!r} returns no series"



def test_the_alerting_rules_fire_when_they_should_and_not_otherwise():
    """promtool's own unit tests of docker/prometheus/alerts.yml (docker/prometheus/alerts.test.yml)."""
    rules = PROMETHEUS_YML.parent / "alerts.yml"
    check = subprocess.run([binary("promtool"), "check", "rules", str(rules)], capture_output=True, text=True,
                           timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 8 rules found" in check.stdout
    tests = subprocess.run([binary("promtool"), "test", "rules", "alerts.test.yml"], cwd=rules.parent,
                           capture_output=True, text=True, timeout=120)
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "SUCCESS" in tests.stdout
