"""`make run` (scripts/run.py) as a user meets it: it comes up, answers, and Ctrl-C leaves nothing behind."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.net import free_port

ROOT = Path(__file__).resolve().parent.parent.parent

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


class RunningDeepOpt:
    """scripts/run.py in a session of its own, as a terminal would run `make run`, with its output collected."""

    def __init__(self, tmp_path: Path, **env: str) -> None:
        self.port = free_port()
        clean = {k: v for k, v in os.environ.items()
                 if k not in {"DJANGO_SETTINGS_MODULE", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND",
                              "DEEPOPT_ADMIN_PASSWORD", "DATABASE_URL"}}
        self.process = subprocess.Popen(
            [sys.executable, "scripts/run.py", "--port", str(self.port)],
            cwd=ROOT, env={**clean, "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}", **env},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
        self.lines: list[str] = []
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, pattern: str, timeout: float = 60) -> re.Match:
        deadline = time.monotonic() + timeout
        exited_at = None
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if match := re.search(pattern, line):
                    return match
            if exited_at is None and self.process.poll() is not None:
                exited_at = time.monotonic()
            if exited_at is not None and time.monotonic() - exited_at > 1:  # its last lines are read by now
                break
            time.sleep(0.1)
        pytest.fail(f"no line matching {pattern!r}; output:\n{self.output}")

    def processes(self) -> list[psutil.Process]:
        root = psutil.Process(self.process.pid)
        return [root, *root.children(recursive=True)]

    def request(self, path: str, body: dict | None = None) -> tuple[int, dict | str]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", data=json.dumps(body).encode() if body else None,
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=20) as response:  # noqa: S310 (a localhost URL)
                status, raw = response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            status, raw = error.code, error.read().decode()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def alive(processes: list[psutil.Process]) -> list[str]:
    return [" ".join(p.cmdline()[:4]) for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.fixture
def deepopt(tmp_path):
    started: list[RunningDeepOpt] = []

    def start(**env: str) -> RunningDeepOpt:
        started.append(RunningDeepOpt(tmp_path, **env))
        return started[-1]

    yield start
    for run in started:
        run.stop()


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_it_starts_everything_answers_and_ctrl_c_leaves_nothing_behind(deepopt):
    # A port where no Redis answers: make run must start its own redis-server there.
    run = deepopt(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    password = run.wait_for_line(r"Created admin user 'admin' with password: (\S+)")[1]
    run.wait_for_line(rf"running at http://127\.0\.0\.1:{run.port}/")

    status, body = run.request("/api/v1/auth/token/", {"username": "admin", "password": password})
    assert status == 200, body
    assert len(body["token"]) == 40
    status, schema = run.request("/api/schema/?format=json")
    assert status == 200
    assert schema["openapi"].startswith("3.")
    assert run.request("/login/")[0] == 200

    children = run.processes()
    names = " ".join(" ".join(p.cmdline()) for p in children)
    for expected in ("redis-server", "daphne", "celery -A deepopt_web worker", "celery -A deepopt_web beat"):
        assert expected in names

    os.killpg(run.process.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
    assert run.process.wait(timeout=60) == 0, run.output
    time.sleep(0.3)
    assert alive(children) == []
    assert "stopped." in run.output


def test_it_stops_the_rest_and_fails_when_a_child_dies(deepopt, redis_url):
    run = deepopt(REDIS_URL=redis_url, DEEPOPT_ADMIN_PASSWORD="a-long-test-password")
    run.wait_for_line(r"running at http://")
    children = run.processes()
    worker = next(p for p in children[1:] if "worker" in p.cmdline() and p.ppid() == run.process.pid)
    worker.kill()

    assert run.process.wait(timeout=60) == 1
    time.sleep(0.3)
    assert alive(children) == []
    assert re.search(r"the celery worker exited \(status -9\); stopped the rest", run.output), run.output
