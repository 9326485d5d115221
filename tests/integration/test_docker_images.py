"""The images, built and run as compose.yaml runs them: docker/Dockerfile's web, worker and beat, and
docker/Dockerfile.gpu's node agent, which then runs a job handed to it by the others while the job's
page, open in Debian's Chromium, follows it live.

Opt-in (`make docker-check`, or DEEPOPT_DOCKER_TESTS=1): building the images takes minutes and needs a
Docker engine, so `make test` and CI skip this file. What compose adds on top of the images comes from
compose.yaml itself (each service's command, environment and health check, with docker/env.example's
required variables set); the containers share the host's network, so what lives outside them is swapped
as in test_compose_services: the `postgres` and `redis` hosts (a fresh PostgreSQL database and Redis
db 13 of this host), web's port (a free one; the health check reads HEALTHCHECK_PORT) and the node's
server URL. Media and the node's work directory are fresh named volumes, as compose's are, so they get
the images' ownership; beat keeps its schedule in the image's /app/var. Everything runs as the images'
user, uid 10001.

Build arguments, for a host that cannot reach Docker Hub or PyTorch's index (this repository's own CI
machine reaches neither; docker/base-from-debian.sh builds a base from Debian's packages):
- DEEPOPT_DOCKER_BASE: both images' BASE_IMAGE (default python:3.11-slim);
- DEEPOPT_DOCKER_WHEELS: a directory of wheels for the CPU image to prefer, served to its build over
  HTTP (WHEELS_URL);
- DEEPOPT_DOCKER_TORCH_INDEX: the CPU image's TORCH_INDEX_URL ("" for none; default the Dockerfile's).
The node image takes its CUDA torch from PyPI, as compose builds it.
"""
from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import re
import subprocess
import threading
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.integration.test_compose_services import (
    SECRETS,
    ComposeServices,
    admin_signs_in,
    metrics_status,
    scheduling_passes,
)
from tests.net import free_port
from tests.unit.test_compose import resolved

BUILD_TIMEOUT_S = 3600

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(2 * BUILD_TIMEOUT_S + 600),  # the builds are part of the fixture's setup
    pytest.mark.skipif(not os.environ.get("DEEPOPT_DOCKER_TESTS"),
                       reason="builds Docker images (minutes): run with `make docker-check`"),
]

ROOT = Path(__file__).resolve().parents[2]
UID = "10001"  # the Dockerfiles' `useradd --uid`
DEADLINE_S = 180
PLACEHOLDER = "placeholder until the agent registers"


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args[:3])} … exited {result.returncode}:\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="module")
def wheels_url() -> Iterator[str | None]:
    """DEEPOPT_DOCKER_WHEELS served over HTTP on this host for the build (which uses the host's network)."""
    directory = os.environ.get("DEEPOPT_DOCKER_WHEELS")
    if not directory:
        yield None
        return
    if not Path(directory).is_dir():
        pytest.fail(f"DEEPOPT_DOCKER_WHEELS={directory} is not a directory")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=directory)
    # The URL is a build argument, part of the pip layer's cache key: the same directory gets the same
    # port from run to run where it is free, so an unchanged requirements.txt is not installed again.
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 38000 + zlib.crc32(directory.encode()) % 1000),
                                                 handler)
    except OSError:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


@pytest.fixture(scope="module")
def images(wheels_url) -> dict[str, str]:
    """Both images, built from this checkout (Docker's layer cache makes a rebuild quick)."""
    from tests.browser.conftest import CHROMIUM

    if not CHROMIUM.exists():
        pytest.fail(f"the job page is watched in Debian's Chromium, missing at {CHROMIUM} (apt-get install chromium)")
    try:
        docker("info", timeout=20)
    except (AssertionError, FileNotFoundError, subprocess.TimeoutExpired) as exc:
        pytest.fail(f"no Docker engine answers, which DEEPOPT_DOCKER_TESTS asks for: {exc}")
    base = ["--build-arg", f"BASE_IMAGE={os.environ.get('DEEPOPT_DOCKER_BASE') or 'python:3.11-slim'}"]
    # The CPU image's torch: PyTorch's CPU index, or the wheel directory and index given. The node image
    # is built as compose builds it, its CUDA torch from PyPI (several GB the first time).
    cpu_torch = []
    if wheels_url:
        cpu_torch += ["--build-arg", f"WHEELS_URL={wheels_url}"]
    if "DEEPOPT_DOCKER_TORCH_INDEX" in os.environ:
        cpu_torch += ["--build-arg", f"TORCH_INDEX_URL={os.environ['DEEPOPT_DOCKER_TORCH_INDEX']}"]
    built = {}
    for name, dockerfile, args in (("app", "docker/Dockerfile", base + cpu_torch),
                                   ("gpu", "docker/Dockerfile.gpu", base)):
        tag = f"deepopt-{name}:docker-test"
        docker("build", "--network", "host", "-f", str(ROOT / dockerfile), *args, "-t", tag, str(ROOT),
               timeout=BUILD_TIMEOUT_S)
        built[name] = tag
    return built


class Stack(ComposeServices):
    """compose.yaml's services as containers on the host's network, named deepopt-test-<run>-<service>."""

    deadline_s = DEADLINE_S

    def __init__(self, images: dict[str, str], database_url: str, redis_url: str) -> None:
        self.images = images
        self.run_id = uuid.uuid4().hex[:8]
        self.compose = resolved(SECRETS)
        self.port = free_port()
        self.server = f"http://127.0.0.1:{self.port}"
        self.database_url, self.redis_url = database_url, redis_url
        self.volumes = {"media": f"deepopt-test-{self.run_id}-media", "node-work": f"deepopt-test-{self.run_id}-node"}
        self.started: list[str] = []

    def name(self, service: str) -> str:
        return f"deepopt-test-{self.run_id}-{service}"

    def environment(self, service: str, **extra: str) -> dict[str, str]:
        env = {key: str(value) for key, value in self.compose["services"][service]["environment"].items()}
        for key, value in env.items():
            if key in ("DATABASE_URL", "REDIS_URL", "DEEPOPT_BROKER_URL", "DEEPOPT_SERVER"):
                assert re.search(r"//[^/]*\b(postgres|redis|web)\b", value), (key, value)
        swaps = {"DATABASE_URL": self.database_url, "REDIS_URL": self.redis_url,
                 "DEEPOPT_BROKER_URL": self.redis_url, "DEEPOPT_SERVER": self.server}
        env.update({key: value for key, value in swaps.items() if key in env})
        return {**env, "HEALTHCHECK_PORT": str(self.port), **extra}

    def command(self, service: str) -> list[str]:
        command = self.compose["services"][service].get("command") or []
        return [part.replace("-p 8000", f"-p {self.port}").replace("-b 0.0.0.0", "-b 127.0.0.1")
                for part in command]

    def start(self, service: str, image: str, **extra_env: str) -> None:
        mounts = []
        for mount in self.compose["services"][service].get("volumes", []):
            source, target = mount.split(":")[:2]
            mounts += ["-v", f"{self.volumes[source]}:{target}"]
        env = [f"--env={key}={value}" for key, value in self.environment(service, **extra_env).items()]
        docker("run", "-d", "--name", self.name(service), "--network", "host", *mounts, *env, image,
               *self.command(service))
        self.started.append(service)

    def exec(self, service: str, *command: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return docker("exec", self.name(service), *command, timeout=timeout, check=False)

    def check(self, service: str, command: list[str]) -> int:
        return self.exec(service, *command).returncode

    def alive(self, service: str) -> bool:
        state = docker("inspect", "-f", "{{.State.Running}}", self.name(service), check=False)
        return state.stdout.strip() == "true"

    def log(self, service: str) -> str:
        result = docker("logs", "--tail", "80", self.name(service), check=False)
        return (result.stdout + result.stderr)[-4000:]

    def remove(self) -> None:
        for service in self.started:
            docker("rm", "-f", self.name(service), check=False)
        for volume in self.volumes.values():
            docker("volume", "rm", "-f", volume, check=False)


def admin_team_with_node(server: str, team: str, node_name: str, hostname: str) -> tuple[requests.Session, int, str]:
    """As README's API tour: the admin's token, a team the admin leads, and a node registered to it with a
    placeholder GPU, which the node's agent replaces with what its host has. Returns the admin's API
    session, the team's id and the node's token (shown this once)."""
    api = requests.Session()
    login = api.post(f"{server}/api/v1/auth/token/", timeout=10,
                     json={"username": "admin", "password": SECRETS["DEEPOPT_ADMIN_PASSWORD"]})
    assert login.status_code == 200, login.text
    api.headers["Authorization"] = f"Token {login.json()['token']}"
    created = api.post(f"{server}/api/v1/teams/", timeout=10, json={"name": team, "max_gpus": 4})
    assert created.status_code == 201, created.text
    team_id = created.json()["id"]
    assert api.post(f"{server}/api/v1/teams/{team_id}/members/", timeout=10,
                    json={"username": "admin", "role": "lead"}).status_code == 201
    node = api.post(f"{server}/api/v1/nodes/", timeout=10, json={
        "name": node_name, "hostname": hostname, "team": team_id,
        "gpus": [{"index": 0, "model": PLACEHOLDER, "memory_mb": 1}]})
    assert node.status_code == 201, node.text
    return api, team_id, node.json()["token"]


@contextlib.contextmanager
def job_page(server: str, job_id: int) -> Iterator:
    """Debian's Chromium, signed in as the admin, on the job's page with its websocket live."""
    from playwright.sync_api import sync_playwright

    from tests.browser.conftest import CHROMIUM, CHROMIUM_ARGS

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            tab = browser.new_context(base_url=server).new_page()
            tab.set_default_timeout(DEADLINE_S * 1000)
            tab.goto(f"/jobs/{job_id}/")
            tab.fill("#id_username", "admin")
            tab.fill("#id_password", SECRETS["DEEPOPT_ADMIN_PASSWORD"])
            tab.click("button:has-text('Sign in')")
            tab.wait_for_url(re.compile(rf"/jobs/{job_id}/$"))
            tab.wait_for_selector("#live-status[data-state=live]")
            tab.evaluate("window.__notReloaded = true")
            yield tab
        finally:
            browser.close()


@pytest.fixture
def stack(images, fresh_postgres_url, redis_db13_url) -> Iterator[Stack]:
    running = Stack(images, fresh_postgres_url, redis_db13_url)
    yield running
    running.remove()


def test_the_images_run_as_compose_runs_them_and_a_node_container_runs_a_job(stack):
    app, gpu = stack.images["app"], stack.images["gpu"]
    # Both images run as their own user, not root.
    for image in (app, gpu):
        who = docker("run", "--rm", "--entrypoint", "id", image, "-u")
        assert who.stdout.strip() == UID, (image, who.stdout)

    # web: migrations, the admin, then daphne; healthy by compose's own check, run inside the container.
    stack.start("web", app)
    stack.wait("web healthy", lambda: stack.healthy("web"), ("web",))
    assert "Created admin user 'admin'" in stack.log("web")

    # worker and beat, once web is healthy; each passes its own check (beat's reads /proc/1/cmdline,
    # which is beat's own only inside its container).
    stack.start("worker", app)
    stack.start("beat", app)
    stack.wait("worker healthy", lambda: stack.healthy("worker"), ("web", "worker", "beat"))
    stack.wait("beat healthy", lambda: stack.healthy("beat"), ("web", "worker", "beat"))
    assert stack.exec("worker", "sh", "-c", "test -w /app/manage.py").returncode != 0, \
        "the app's code is writable by the container's user"

    # Beat's ticks reach the worker, whose passes show in web's /metrics; the admin signs in, and
    # WhiteNoise serves the static files collected when the image was built.
    assert metrics_status(stack.server, "wrong") == 401
    stack.wait("scheduling passes from beat, run by the worker", lambda: scheduling_passes(stack.server) >= 2,
               ("web", "worker", "beat"))
    admin_signs_in(stack.server)

    node_name = f"container-{stack.run_id}"
    api, team_id, node_token = admin_team_with_node(stack.server, "Docker", node_name, "127.0.0.1")

    # The node image without its token says so in one line and stops; with it, the agent registers
    # this host (no GPU here, so CPU slots) and its worker answers.
    refused = docker("run", "--rm", "--network", "host", f"--env=DEEPOPT_SERVER={stack.server}", gpu,
                     timeout=120, check=False)
    assert refused.returncode != 0
    assert "token" in (refused.stdout + refused.stderr).lower(), refused.stderr[-500:]
    stack.start("gpu-node", gpu, DEEPOPT_NODE_TOKEN=node_token)

    def registered() -> dict | None:
        rows = api.get(f"{stack.server}/api/v1/nodes/", timeout=10).json()["results"]
        mine = [row for row in rows if row["name"] == node_name and row.get("device_type") == "cpu"]
        return mine[0] if mine else None

    stack.wait("the node container to register its CPU slots", registered, ("web", "worker", "beat", "gpu-node"))
    # On the shared host network the compose worker answers pings under this hostname too; the node's
    # check counts only the node's own worker (node.<name>@…).
    stack.wait("the node container healthy", lambda: stack.healthy("gpu-node"), ("gpu-node",))

    # A job goes through the whole stack: web queues it, the worker's pass places it on the node, the
    # node's worker runs it and reports back; its artifact lands in the media volume. Its page, open in
    # Chromium, follows it over the websocket (daphne and the Redis channel layer in the web container).
    job = api.post(f"{stack.server}/api/v1/jobs/", timeout=10, json={
        "name": "in containers", "team": team_id, "kind": "selftest", "resources": {"gpus": 1},
        "spec": {"steps": 20, "step_seconds": 0.5}})
    assert job.status_code == 201, job.text
    job_url = f"{stack.server}/api/v1/jobs/{job.json()['id']}/"

    def ended() -> bool:
        return api.get(job_url, timeout=10).json()["state"] in ("succeeded", "failed", "cancelled")

    with job_page(stack.server, job.json()["id"]) as tab:
        first = tab.inner_text("[data-testid=job-state]").strip()
        assert first in ("queued", "allocated", "running"), first
        stack.wait("the job to end", ended, ("web", "worker", "beat", "gpu-node"))
        tab.wait_for_function(
            "document.querySelector('[data-testid=job-state]').innerText.trim() === 'succeeded'")
        assert tab.evaluate("window.__notReloaded") is True
    detail = api.get(job_url, timeout=10).json()
    assert detail["state"] == "succeeded", (detail, stack.log("gpu-node"))
    assert abs(detail["result"]["pi"] - 3.141592653589793) < 1e-9
    artifacts = api.get(f"{job_url}artifacts/", timeout=10).json()["results"]
    [artifact] = [a for a in artifacts if a["name"] == "selftest.json"]
    download = api.get(artifact["download_url"], timeout=10)
    assert download.status_code == 200
    assert json.loads(download.content)["pi"] == detail["result"]["pi"]
    stored = stack.exec("web", "sh", "-c", "find /data/media -name 'selftest*.json' -user deepopt | wc -l")
    assert stored.stdout.strip() not in ("", "0"), stored
