"""compose.yaml's app services run as compose would run them, without Docker.

This runs in `make test`, with no Docker engine (test_docker_images builds and runs the images
themselves, opt-in). What compose adds on top of the image is run here from the file itself: the
`web`, `worker` and `beat` services' commands and environment (x-app, with docker/env.example's
required variables set), after the Dockerfile's collectstatic step, on a fresh PostgreSQL database and
a Redis database of their own. Only what lives outside the compose network is swapped: the `postgres`
and `redis` hosts, the web port (the test picks a free one; the health check reads it from
HEALTHCHECK_PORT), MEDIA_ROOT, STATIC_ROOT (the image collects into its own) and beat's schedule file.

Then, in compose's order: web's health check (docker/healthcheck.py web) passes after its migrations;
the worker's health check (a ping through the broker) passes; beat's schedule makes the worker run
scheduling passes, which /metrics (with the bearer token compose hands Prometheus) shows; and the
admin made by `ensure_admin` signs in. Beat's own health check reads /proc/1/cmdline, true only inside
its container, so beat is judged by its passes instead.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.net import free_port
from tests.unit.test_compose import resolved

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
SECRETS = {  # what docker/env.example asks for; test values
    "SECRET_KEY": "compose-test-" + "k" * 40,
    "POSTGRES_PASSWORD": "unused",  # the test's PostgreSQL trusts local connections
    "DEEPOPT_METRICS_TOKEN": "compose-test-metrics-token",
    "GRAFANA_ADMIN_PASSWORD": "unused",
    "DEEPOPT_ADMIN_PASSWORD": "compose-admin-pass-123",
}
DEADLINE_S = 120


class ComposeServices:
    """What both ways of running compose's services share (processes here, containers in
    test_docker_images): the services' own health checks, and waiting for a condition while they run.
    A subclass says how a check command runs, whether a service still runs, and its log."""

    deadline_s = DEADLINE_S

    def check(self, service: str, command: list[str]) -> int:
        raise NotImplementedError

    def alive(self, service: str) -> bool:
        raise NotImplementedError

    def log(self, service: str) -> str:
        raise NotImplementedError

    def healthy(self, service: str) -> bool:
        test = self.compose["services"][service]["healthcheck"]["test"]
        assert test[0] == "CMD", test
        return self.check(service, test[1:]) == 0

    def wait(self, what: str, condition, services: tuple[str, ...]) -> None:
        deadline = time.monotonic() + self.deadline_s
        while not condition():
            for name in services:
                if not self.alive(name):
                    raise AssertionError(f"{name} exited:\n{self.log(name)}")
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {name}\n{self.log(name)}" for name in services)
                raise AssertionError(f"{what} within {self.deadline_s} s\n{logs}")
            time.sleep(0.5)


class Services(ComposeServices):
    def __init__(self, tmp: Path, database_url: str, redis_url: str) -> None:
        self.tmp = tmp
        self.compose = resolved(SECRETS)   # as `docker compose --env-file .env` reads it
        self.port = free_port()
        env = {key: str(value) for key, value in self.compose["services"]["web"]["environment"].items()}
        assert urlsplit(env["DATABASE_URL"]).hostname == "postgres", env["DATABASE_URL"]
        assert env["REDIS_URL"] == "redis://redis:6379/0", env["REDIS_URL"]
        # STATIC_ROOT too: the image's is its own; here the collected files must not land in the checkout.
        env.update(DATABASE_URL=database_url, REDIS_URL=redis_url, MEDIA_ROOT=str(tmp / "media"),
                   STATIC_ROOT=str(tmp / "static"))
        venv_bin = str(Path(sys.executable).parent)
        self.env = {
            **env,
            # The Dockerfile's ENV lines, and a PATH on which `python`, `daphne` and `celery` are this venv's.
            "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1",
            "PATH": f"{venv_bin}:{os.environ.get('PATH', '/usr/bin:/bin')}", "HOME": str(tmp),
            "HEALTHCHECK_PORT": str(self.port),
        }
        self.processes: dict[str, subprocess.Popen] = {}

    def command(self, service: str) -> list[str]:
        command = list(self.compose["services"][service]["command"])
        swaps = {"-p 8000": f"-p {self.port}", "-b 0.0.0.0": "-b 127.0.0.1",
                 "/app/var/celerybeat-schedule": str(self.tmp / "celerybeat-schedule")}
        for i, part in enumerate(command):
            for old, new in swaps.items():
                part = part.replace(old, new)
            command[i] = part
        return command

    def start(self, service: str) -> None:
        log = (self.tmp / f"{service}.log").open("ab")
        self.processes[service] = subprocess.Popen(self.command(service), cwd=ROOT, env=self.env, stdout=log,
                                                   stderr=subprocess.STDOUT, start_new_session=True)

    def log(self, service: str) -> str:
        return (self.tmp / f"{service}.log").read_text(errors="replace")[-3000:]

    def check(self, service: str, command: list[str]) -> int:
        return subprocess.run(command, cwd=ROOT, env=self.env, capture_output=True, timeout=30).returncode

    def alive(self, service: str) -> bool:
        return self.processes[service].poll() is None

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@pytest.fixture
def services(tmp_path, fresh_postgres_url, redis_db13_url) -> Iterator[Services]:
    running = Services(tmp_path, fresh_postgres_url, redis_db13_url)
    yield running
    running.stop()


def metric(text: str, name: str) -> float | None:
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(match.group(1)) if match else None


def metrics_status(base: str, token: str) -> int:
    import requests

    return requests.get(f"{base}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=10).status_code


def scheduling_passes(base: str) -> float:
    """The passes web's /metrics reports, read with the token compose hands Prometheus."""
    import requests

    token = {"Authorization": f"Bearer {SECRETS['DEEPOPT_METRICS_TOKEN']}"}
    response = requests.get(f"{base}/metrics", headers=token, timeout=10)
    assert response.status_code == 200, response.text[:500]
    return metric(response.text, "deepopt_scheduler_pass_seconds_count") or 0.0


def admin_signs_in(base: str):  # noqa: ANN201
    """The admin that ensure_admin made signs in through the login form (CSRF and all, plain HTTP as in
    compose's defaults) and lands on the dashboard; the static files (collected as the Dockerfile does)
    are served. Returns the signed-in session."""
    import requests

    session = requests.Session()
    login = session.get(f"{base}/login/", timeout=10)
    assert login.status_code == 200
    answer = session.post(f"{base}/login/", timeout=10, headers={"Referer": f"{base}/login/"}, data={
        "username": "admin", "password": SECRETS["DEEPOPT_ADMIN_PASSWORD"],
        "csrfmiddlewaretoken": session.cookies["csrftoken"]})
    assert answer.status_code == 200
    assert answer.url == f"{base}/", answer.url
    assert "Dashboard" in answer.text
    static = session.get(f"{base}/static/js/live.js", timeout=10)
    assert static.status_code == 200
    assert "DeepOptLive" in static.text
    return session


@pytest.mark.skipif(shutil.which("sh") is None, reason="web's command is a sh -c line")
def test_web_worker_and_beat_start_from_compose_and_work_together(services):

    # The Dockerfile collects the static files at build time, with a throwaway key.
    step = "SECRET_KEY=collectstatic-only python manage.py collectstatic --noinput"
    assert step in DOCKERFILE.read_text()
    collect = subprocess.run(["python", "manage.py", "collectstatic", "--noinput"], cwd=ROOT, capture_output=True,
                             text=True, timeout=300, env={**services.env, "SECRET_KEY": "collectstatic-only"})
    assert collect.returncode == 0, collect.stdout + collect.stderr

    # web: migrations, the admin, then daphne; healthy by its own check.
    services.start("web")
    services.wait("web healthy", lambda: services.healthy("web"), ("web",))
    assert "Created admin user 'admin'" in services.log("web")

    # worker and beat start once web is healthy (depends_on); the worker answers its ping.
    services.start("worker")
    services.start("beat")
    services.wait("worker healthy", lambda: services.healthy("worker"), ("web", "worker", "beat"))

    base = f"http://127.0.0.1:{services.port}"
    assert metrics_status(base, "wrong") == 401
    # Beat's schedule reaches the worker: its scheduling passes show in web's /metrics (through Redis).
    services.wait("a scheduling pass from beat, run by the worker", lambda: scheduling_passes(base) >= 2,
                  ("web", "worker", "beat"))
    assert "scheduling.run_pass" in services.log("worker")

    # The admin signs in, and the dashboard, the API and the static files answer.
    session = admin_signs_in(base)
    jobs = session.get(f"{base}/api/v1/jobs/", timeout=10)
    assert jobs.status_code == 200
    assert jobs.json()["count"] == 0
