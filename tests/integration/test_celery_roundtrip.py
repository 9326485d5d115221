"""A task goes through the real Redis broker to a real Celery worker process and its result comes back."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from celery.backends.redis import RedisBackend

from apps.cluster.tasks import ping
from deepopt_web.celery import app as celery_app

ROOT = Path(__file__).resolve().parent.parent.parent

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture
def worker(redis_url: str, unique_queue: str):
    """A Celery worker process consuming only this test's queue, on the test Redis database."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "deepopt_web.settings.test",
        "CELERY_BROKER_URL": redis_url,
        "CELERY_RESULT_BACKEND": redis_url,
        "PYTHONUNBUFFERED": "1",
    }
    command = [
        sys.executable, "-m", "celery", "-A", "deepopt_web", "worker",
        "-Q", unique_queue, "-c", "1", "--pool", "solo", "-n", f"{unique_queue}@%h",
        "--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel", "warning",
    ]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_a_ping_task_round_trips_through_redis_to_a_real_worker(redis_url, unique_queue, worker):
    payload = {"nonce": uuid.uuid4().hex, "nested": [1, "two", {"three": 3.0}]}
    backend = RedisBackend(app=celery_app, url=redis_url)
    # The connection and backend are given explicitly rather than read from settings, so the task
    # travels on the test Redis database the worker listens on, whatever REDIS_URL says.
    with celery_app.connection_for_write(redis_url) as connection:
        sent = ping.apply_async(args=[payload], queue=unique_queue, connection=connection)
    result = celery_app.AsyncResult(sent.id, backend=backend)
    deadline = time.monotonic() + 30
    while not result.ready():
        # A worker that died on start-up would otherwise cost the whole timeout and say nothing.
        if worker.poll() is not None or time.monotonic() > deadline:
            worker.terminate()
            output, _ = worker.communicate(timeout=15)
            pytest.fail(f"the worker did not answer (exit status {worker.returncode}); its output:\n{output}")
        time.sleep(0.05)
    answer = result.get(timeout=5)
    result.forget()

    assert answer["pong"] is True
    assert answer["echo"] == payload  # JSON both ways: the nested payload comes back unchanged
    assert answer["pid"] == worker.pid  # the solo pool runs the task in the worker process itself
    assert answer["pid"] != os.getpid()
