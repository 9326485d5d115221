"""docker/compose.yaml brought up by `docker compose` itself, as README's deployment steps do.

Opt-in, with test_docker_images (`make docker-check`, or DEEPOPT_DOCKER_TESTS=1): it builds images and
needs a Docker engine with the compose plugin. Nothing in compose.yaml is swapped: its services talk over
compose's own network by their service names (postgres, redis, web:8000), with its volumes, health checks
and `depends_on` order, the metrics token handed to Prometheus as compose's secret file, and the ports it
publishes. A compose override file (written by the test) only:
- names the images deepopt:compose-check and deepopt-gpu:compose-check, so the test does not retag a
  developer's deepopt:latest;
- passes the build arguments of test_docker_images (DEEPOPT_DOCKER_BASE, DEEPOPT_DOCKER_WHEELS,
  DEEPOPT_DOCKER_TORCH_INDEX), so the node image's torch is the CPU wheel given there when given;
- on an engine without the NVIDIA runtime, drops the gpu-node's GPU reservation (`deploy: !reset`): its
  agent then registers CPU slots, as on any host without GPUs;
- with DEEPOPT_DOCKER_STANDINS=1, for a host that cannot pull from Docker Hub, runs postgres, redis and
  prometheus from docker/standins/Dockerfile (Debian's packages) instead of the official images.
  Grafana, which has no stand-in, is then the one service not started.

Then: every service healthy by its own check; the admin signs in through the published port; /metrics
refuses a wrong token while Prometheus, on 127.0.0.1 only, scrapes web:8000 with the secret and has loaded
the alert rules; a node registered through the API gets its token through .env and the `gpu` profile's
gpu-node, joining over the compose network, runs a job whose artifact lands in the media volume; after
`docker compose down` and `up` (volumes kept) the job, its artifact and the admin are still there.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml

from tests.integration.test_compose_services import SECRETS, admin_signs_in, metrics_status, scheduling_passes
from tests.integration.test_docker_images import (  # wheels_url: a fixture
    BUILD_TIMEOUT_S,
    PLACEHOLDER,
    admin_team_with_node,
    docker,
    wheels_url,  # noqa: F401
)
from tests.net import free_port

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(2 * BUILD_TIMEOUT_S + 900),  # the builds happen inside the fixture
    pytest.mark.skipif(not os.environ.get("DEEPOPT_DOCKER_TESTS"),
                       reason="builds Docker images and runs docker compose (minutes): run with `make docker-check`"),
]

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker" / "compose.yaml"
STANDINS = ROOT / "docker" / "standins"
SERVICES = ["postgres", "redis", "web", "worker", "beat", "prometheus"]  # and grafana, with the official images
WAIT_S = 600
DEADLINE_S = 180


def wait_for(what: str, condition, project: ComposeProject, deadline_s: float = DEADLINE_S):  # noqa: ANN201
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            value = condition()
        except requests.RequestException:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {deadline_s} s\n{project.logs()}")
        time.sleep(1)


class ComposeProject:
    """One `docker compose -p deepopt-check-<id>` project of compose.yaml plus the test's override file."""

    def __init__(self, directory: Path, wheels: str | None) -> None:
        self.name = f"deepopt-check-{uuid.uuid4().hex[:8]}"
        self.env_file = directory / "compose.env"
        self.override = directory / "compose.override.yaml"
        self.env = {**SECRETS, "POSTGRES_PASSWORD": f"check{uuid.uuid4().hex[:16]}",
                    "PORT": str(free_port()), "PROMETHEUS_PORT": str(free_port()), "GRAFANA_PORT": str(free_port())}
        self.server = f"http://127.0.0.1:{self.env['PORT']}"
        self.prometheus = f"http://127.0.0.1:{self.env['PROMETHEUS_PORT']}"
        self.standins = bool(os.environ.get("DEEPOPT_DOCKER_STANDINS"))
        self.services = SERVICES if self.standins else [*SERVICES, "grafana"]
        self.write_env()
        self.override.write_text(yaml.safe_dump(self.overrides(wheels), sort_keys=False)
                                 .replace("RESET_MARKER", "!reset {}"))

    def overrides(self, wheels: str | None) -> dict:
        base = os.environ.get("DEEPOPT_DOCKER_BASE")
        common = {"BASE_IMAGE": base} if base else {}
        if wheels:
            common["WHEELS_URL"] = wheels
        app_args = dict(common)
        if "DEEPOPT_DOCKER_TORCH_INDEX" in os.environ:
            app_args["TORCH_INDEX_URL"] = os.environ["DEEPOPT_DOCKER_TORCH_INDEX"]
        # The builds use the host's network, as test_docker_images' do (the wheel server is on 127.0.0.1).
        services: dict = {"web": {"image": "deepopt:compose-check", "build": {"network": "host", "args": app_args}}}
        services.update({name: {"image": "deepopt:compose-check"} for name in ("worker", "beat")})
        services["gpu-node"] = {"image": "deepopt-gpu:compose-check", "build": {"network": "host", "args": common}}
        runtimes = docker("info", "--format", "{{json .Runtimes}}", timeout=20).stdout
        if "nvidia" not in runtimes:
            services["gpu-node"]["deploy"] = "RESET_MARKER"
        if self.standins:
            for name in ("postgres", "redis", "prometheus"):
                services[name] = {"image": f"deepopt-standin-{name}:compose-check"}
        return {"services": services}

    def write_env(self, **extra: str) -> None:
        self.env.update(extra)
        self.env_file.write_text("".join(f"{key}={value}\n" for key, value in self.env.items()))

    def run(self, *args: str, timeout: float) -> subprocess.CompletedProcess:
        command = ["docker", "compose", "--env-file", str(self.env_file), "-p", self.name,
                   "-f", str(COMPOSE_FILE), "-f", str(self.override), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout)

    def compose(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        result = self.run(*args, timeout=timeout)
        if result.returncode != 0:
            raise AssertionError(f"docker compose {' '.join(args)} exited {result.returncode}:\n"
                                 f"{result.stdout[-3000:]}\n{result.stderr[-4000:]}\n{self.logs()}")
        return result

    def up(self, *services: str, build: bool = False, profile: str | None = None) -> None:
        args = ["--profile", profile] if profile else []
        self.compose(*args, "up", "-d", *(["--build"] if build else []), "--wait", "--wait-timeout", str(WAIT_S),
                     *services, timeout=BUILD_TIMEOUT_S * 2 + WAIT_S)

    def states(self) -> dict[str, str]:
        """service -> its health ("healthy", "starting", …, or the state where it has no check)."""
        out = self.compose("--profile", "gpu", "ps", "--all", "--format", "json", timeout=60).stdout.strip()
        # compose prints one JSON object per line (older versions: one array).
        rows = json.loads(out) if out.startswith("[") else [json.loads(line) for line in out.splitlines()]
        return {row["Service"]: row.get("Health") or row["State"] for row in rows}

    def logs(self) -> str:
        result = self.run("--profile", "gpu", "logs", "--no-color", "--tail", "40", timeout=60)
        return (result.stdout + result.stderr)[-8000:]

    def down(self) -> None:
        """Containers and the network go; the volumes stay."""
        self.compose("--profile", "gpu", "down", "--remove-orphans", timeout=300)


@pytest.fixture
def project(tmp_path, wheels_url) -> Iterator[ComposeProject]:  # noqa: F811 (the imported fixture)
    try:
        version = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        pytest.fail("DEEPOPT_DOCKER_TESTS asks for Docker, which is not installed")
    if version.returncode != 0:
        pytest.fail(f"the docker compose plugin does not answer: {version.stderr.strip()[:300]}")
    running = ComposeProject(tmp_path, wheels_url)
    if running.standins:
        base = os.environ.get("DEEPOPT_DOCKER_BASE")
        for name in ("postgres", "redis", "prometheus"):
            docker("build", "--network", "host", *(["--build-arg", f"BASE_IMAGE={base}"] if base else []),
                   "--target", name, "-t", f"deepopt-standin-{name}:compose-check",
                   "-f", str(STANDINS / "Dockerfile"), str(STANDINS), timeout=BUILD_TIMEOUT_S)
    try:
        yield running
    finally:
        running.run("--profile", "gpu", "down", "--remove-orphans", "--volumes", timeout=300)


def test_docker_compose_up_runs_the_stack_and_a_gpu_profile_node_runs_a_job(project):
    # compose itself accepts the file with the test's .env (every required variable set).
    project.compose("config", "--quiet")

    # Up, in compose's order (postgres and redis healthy, then web, then the rest), every service
    # healthy by its own check.
    project.up(*project.services, build=True)
    states = project.states()
    assert {name: states.get(name) for name in project.services} == dict.fromkeys(project.services, "healthy"), states
    web_log = project.compose("logs", "web", timeout=60).stdout
    assert "Created admin user 'admin'" in web_log, web_log[-2000:]

    # The web app on the published port: sign-in with the admin's password from .env, static files, and
    # /metrics refusing a wrong token; beat's ticks run by the worker show in it.
    admin_signs_in(project.server)
    assert metrics_status(project.server, "wrong") == 401
    wait_for("scheduling passes from beat, run by the worker", lambda: scheduling_passes(project.server) >= 2, project)

    # Prometheus listens on this host's loopback only, and scrapes web:8000 over the compose network with
    # the token compose handed it as /run/secrets/metrics_token; its alert rules are loaded.
    published = project.compose("port", "prometheus", "9090", timeout=30).stdout.strip()
    assert published.startswith("127.0.0.1:"), published

    def deepopt_target_up() -> bool:
        targets = requests.get(f"{project.prometheus}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
        mine = [t for t in targets if t["labels"]["job"] == "deepopt"]
        return bool(mine) and mine[0]["health"] == "up"

    wait_for("Prometheus to scrape web:8000 with the token", deepopt_target_up, project, deadline_s=90)

    def scraped_passes() -> list:
        answer = requests.get(f"{project.prometheus}/api/v1/query", timeout=10,
                              params={"query": 'deepopt_scheduler_pass_seconds_count{job="deepopt"}'}).json()
        return answer["data"]["result"]

    [series] = wait_for("a scraped deepopt series in Prometheus", scraped_passes, project, deadline_s=60)
    assert float(series["value"][1]) >= 1, series
    rules = requests.get(f"{project.prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
    assert sum(len(group["rules"]) for group in rules) >= 1, rules

    # A node, as README's compose steps: register it through the API, put its token in .env, bring up the
    # gpu profile's gpu-node, which reaches web:8000 and redis:6379 by their service names.
    api, team_id, node_token = admin_team_with_node(project.server, "Compose", "compose-node", "gpu-node")
    project.write_env(DEEPOPT_NODE_TOKEN=node_token)
    project.up("gpu-node", build=True, profile="gpu")
    assert project.states()["gpu-node"] == "healthy"

    def registered() -> bool:
        rows = api.get(f"{project.server}/api/v1/nodes/", timeout=10).json()["results"]
        # The agent replaces the placeholder GPU with what the host has (CPU slots where it has no GPU).
        return any(row["name"] == "compose-node" and row["gpus"]
                   and PLACEHOLDER not in {gpu["model"] for gpu in row["gpus"]} for row in rows)

    wait_for("the gpu-node's agent to register what its host has", registered, project)

    job = api.post(f"{project.server}/api/v1/jobs/", timeout=10, json={
        "name": "through compose", "team": team_id, "kind": "selftest", "resources": {"gpus": 1},
        "spec": {"steps": 10, "step_seconds": 0.3}})
    assert job.status_code == 201, job.text
    job_url = f"{project.server}/api/v1/jobs/{job.json()['id']}/"
    wait_for("the job to end", lambda: api.get(job_url, timeout=10).json()["state"]
             in ("succeeded", "failed", "cancelled"), project)
    detail = api.get(job_url, timeout=10).json()
    assert detail["state"] == "succeeded", (detail, project.logs())
    [artifact] = [a for a in api.get(f"{job_url}artifacts/", timeout=10).json()["results"]
                  if a["name"] == "selftest.json"]
    assert json.loads(api.get(artifact["download_url"], timeout=10).content)["pi"] == detail["result"]["pi"]

    # `down` keeps the volumes: after `up` again, PostgreSQL still has the job and the admin (not made
    # again), and the media volume the artifact.
    project.down()
    assert not project.states(), "containers left after docker compose down"
    project.up(*project.services)
    web_log = project.compose("logs", "web", timeout=60).stdout
    assert "Created admin user" not in web_log, web_log[-2000:]
    admin_signs_in(project.server)
    assert api.get(job_url, timeout=10).json()["state"] == "succeeded"
    download = api.get(artifact["download_url"], timeout=10)
    assert download.status_code == 200
    assert json.loads(download.content)["pi"] == detail["result"]["pi"]
