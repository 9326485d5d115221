"""Real nodes against a live server: agents and Celery workers as separate processes, tasks through the
real Redis broker, runner subprocesses, and every report over HTTP with the node token.

The web app runs in pytest-django's live server (its scheduling trigger `inline`, its dispatch on the
test Redis database); the nodes know only its URL, their token and the broker, as a GPU host would. The
reconciler is called by the test where beat would call it, with the silence thresholds cut to seconds.
On SQLite the test database is a file (not the in-memory default), so the live server's thread and
the test's own queries each have a connection of their own.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest
import requests
from django.conf import settings as django_settings

from apps.cluster.models import GpuNode, MetricSample
from apps.scheduling.models import Allocation, AttemptRun, Job
from apps.scheduling.reconciler import reconcile

ROOT = Path(__file__).resolve().parent.parent.parent

if (django_settings.DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3"
        and not django_settings.DATABASES["default"].get("TEST", {}).get("NAME")):
    django_settings.DATABASES["default"].setdefault("TEST", {})["NAME"] = str(
        Path(tempfile.gettempdir()) / f"deepopt-test-workers-{os.getpid()}.sqlite3")

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150), pytest.mark.django_db(transaction=True)]

# Short enough for a test, long enough that a loaded 2-core machine never misses a 1 s heartbeat by it.
SILENT_S = 10.0


@pytest.fixture
def cluster_on(settings, live_server, tmp_path):
    """cluster_on(broker_url): the web app's side, with passes run on submit and allocated attempts sent
    through that broker; the nodes started on it are stopped, and their queues removed, afterwards."""
    made: list[Cluster] = []

    def make(broker_url: str) -> Cluster:
        settings.DEEPOPT_SCHEDULER_TRIGGER = "inline"
        settings.DEEPOPT_DISPATCH = "celery"
        settings.DEEPOPT_DISPATCH_BROKER_URL = broker_url
        settings.MEDIA_ROOT = tmp_path / "media"
        settings.DEEPOPT_WORKERS = {**settings.DEEPOPT_WORKERS, "node_silent_s": SILENT_S,
                                    "attempt_silent_s": SILENT_S, "heartbeat_interval_s": 1.0}
        made.append(Cluster(live_server.url, broker_url, tmp_path, []))
        return made[-1]

    yield make
    import redis

    for cluster in made:
        for node in cluster.nodes:
            node.stop()
        try:
            client = redis.Redis.from_url(cluster.redis_url, socket_connect_timeout=2)
            for node in cluster.nodes:
                for key in client.scan_iter(match=f"*{node.name}*"):
                    client.delete(key)
        except redis.RedisError:
            pass  # a private Redis the test already stopped


@pytest.fixture
def cluster(cluster_on, redis_url):
    return cluster_on(redis_url)


class NodeProcess:
    """`python -m workers.agent` (which starts the node's Celery worker) in a session of its own."""

    def __init__(self, name: str, token: str, server: str, redis_url: str, work_dir: Path, slots: int) -> None:
        self.name, self.token, self.log_path, self.work_dir = name, token, work_dir / "agent.log", work_dir
        work_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "DEEPOPT_NODE_TOKEN": token, "DEEPOPT_BROKER_URL": redis_url,
               "DEEPOPT_WORK_DIR": str(work_dir), "DEEPOPT_POLL_S": "0.5", "DEEPOPT_PROGRESS_S": "0.5",
               "PYTHONUNBUFFERED": "1"}
        self.log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "workers.agent", "--server", server, "--device", "cpu", "--cpu-slots", str(slots),
             "--interval", "1", "--worker-loglevel", "warning"],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.process.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def kill9(self) -> None:
        """The node vanishes, as in a power cut: its worker (and with it the runner) first, the agent last,
        so that no process of the node gets to say goodbye (the agent's death would SIGTERM the worker)."""
        root, *children = self.tree()
        for process in children:
            process.kill()
        psutil.wait_procs(children, timeout=5)
        root.kill()
        self.process.wait(timeout=10)
        # A worker the agent started again in the meantime would get SIGTERM from the agent's death and
        # say goodbye; it is in the agent's process group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        for process in self.tree():  # nothing of the node may outlive the test
            process.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.log.close()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]


class Cluster:
    def __init__(self, server: str, redis_url: str, tmp_path: Path, nodes: list[NodeProcess]) -> None:
        self.server, self.redis_url, self.tmp_path, self.nodes = server, redis_url, tmp_path, nodes

    def api(self, user) -> requests.Session:  # noqa: ANN001
        from rest_framework.authtoken.models import Token

        session = requests.Session()
        token, _ = Token.objects.get_or_create(user=user)
        session.headers["Authorization"] = f"Token {token.key}"
        return session

    def register(self, lead, team, name: str) -> str:  # noqa: ANN001
        """The lead registers the node through the API; the answer holds its token, once."""
        response = self.api(lead).post(f"{self.server}/api/v1/nodes/", json={
            "name": name, "hostname": "127.0.0.1", "team": team.pk,
            "gpus": [{"index": 0, "model": "placeholder until the agent registers", "memory_mb": 1}]})
        assert response.status_code == 201, response.text
        return response.json()["token"]

    def start_node(self, lead, team, slots: int = 2) -> NodeProcess:  # noqa: ANN001
        name = f"t-{uuid.uuid4().hex[:8]}"
        node = NodeProcess(name, self.register(lead, team, name), self.server, self.redis_url,
                           self.tmp_path / name, slots)
        self.nodes.append(node)
        wait_for(lambda: GpuNode.objects.filter(name=name, device_type="cpu", gpus__index=slots - 1).exists(),
                 30, f"node {name} to register its CPU slots", node)
        return node


def wait_for(check, timeout: float, what: str, *nodes: NodeProcess):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    logs = "\n".join(f"--- {n.name} ---\n{n.output()}" for n in nodes)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{logs}")


def submit(cluster: Cluster, user, team, **spec) -> int:  # noqa: ANN001
    body = {"name": "self-test", "team": team.pk, "kind": "selftest", "resources": {"gpus": 1}, "spec": spec}
    response = cluster.api(user).post(f"{cluster.server}/api/v1/jobs/", json=body)
    assert response.status_code == 201, response.text
    assert response.json()["state"] == "queued"
    return response.json()["id"]


def job_state(job_id: int) -> str:
    return Job.objects.values_list("state", flat=True).get(pk=job_id)


def spawned_pid(job_id: int) -> int | None:
    """The runner's pid, from the worker's first progress line."""
    from apps.scheduling.models import JobEvent

    event = JobEvent.objects.filter(job_id=job_id, kind="progress", data__type="spawned").order_by("-id").first()
    return event.data["pid"] if event is not None else None


def live_allocations(job_id: int) -> int:
    return Allocation.objects.filter(job_id=job_id, released_at__isnull=True).count()


def test_a_job_runs_on_a_node_and_succeeds_with_the_runners_result(cluster, alice, bob, charlie, team_a):
    node = cluster.start_node(alice, team_a)
    wait_for(lambda: MetricSample.objects.filter(node__name=node.name, gpu_index=None).exists(), 20,
             "a heartbeat", node)
    job_id = submit(cluster, bob, team_a, steps=10, step_seconds=0.1)
    wait_for(lambda: job_state(job_id) in ("succeeded", "failed", "cancelled"), 60, "the job to end", node)

    detail = cluster.api(bob).get(f"{cluster.server}/api/v1/jobs/{job_id}/").json()
    assert detail["state"] == "succeeded", detail
    result = detail["result"]
    assert result["type"] == "final"
    assert result["steps"] == 10
    assert abs(result["pi"] - 3.141592653589793) < 1e-9
    assert result["cuda_visible_devices"] == ""  # a CPU slot: the runner sees no GPU
    events = cluster.api(bob).get(f"{cluster.server}/api/v1/jobs/{job_id}/events/").json()["results"]
    states = [e["to_state"] for e in events if e["kind"] == "state"]
    assert states == ["queued", "allocated", "running", "succeeded"]
    steps = [e["data"]["step"] for e in events if e["kind"] == "progress" and "step" in e["data"]]
    assert steps == sorted(steps)
    assert steps[-1] == 10
    assert live_allocations(job_id) == 0

    artifacts = cluster.api(bob).get(f"{cluster.server}/api/v1/jobs/{job_id}/artifacts/").json()["results"]
    [artifact] = [a for a in artifacts if a["name"] == "selftest.json"]
    download = cluster.api(bob).get(artifact["download_url"])
    assert download.status_code == 200
    assert json.loads(download.content)["pi"] == result["pi"]
    assert cluster.api(charlie).get(artifact["download_url"]).status_code == 404

    # The worker's result once more (as after a lost answer), and as a stale attempt: nothing changes.
    run = AttemptRun.objects.get(job_id=job_id, attempt=1)
    agent = requests.Session()
    agent.headers["Authorization"] = f"Node {node.token}"
    repeat = agent.post(f"{cluster.server}/api/v1/agent/jobs/{job_id}/attempts/1/result/",
                        json={"run": run.run_id, "status": "failed", "error": "late duplicate"})
    assert repeat.status_code == 200
    assert repeat.json()["status"] == "ignored"
    stale = agent.post(f"{cluster.server}/api/v1/agent/jobs/{job_id}/attempts/1/progress/",
                       json={"run": run.run_id, "seq": 1, "lines": [{"step": 99}]})
    assert stale.status_code == 200
    assert stale.json()["status"] == "ignored"
    assert cluster.api(bob).get(f"{cluster.server}/api/v1/jobs/{job_id}/").json() == {**detail}

    # Another node's token may not report on this job at all.
    other = requests.Session()
    other.headers["Authorization"] = f"Node {cluster.register(alice, team_a, 'other-node')}"
    forged = other.post(f"{cluster.server}/api/v1/agent/jobs/{job_id}/attempts/1/result/",
                        json={"run": run.run_id, "status": "failed"})
    assert forged.status_code == 404
    assert job_state(job_id) == "succeeded"


def test_a_cancel_kills_the_runner_within_5_seconds_and_frees_its_slot(cluster, alice, team_a):
    node = cluster.start_node(alice, team_a, slots=1)
    job_id = submit(cluster, alice, team_a, steps=600, step_seconds=0.1)
    pid = wait_for(lambda: spawned_pid(job_id), 60, "the runner to start", node)
    assert psutil.pid_exists(pid)
    wait_for(lambda: job_state(job_id) == "running", 10, "the job to run", node)

    began = time.monotonic()
    response = cluster.api(alice).post(f"{cluster.server}/api/v1/jobs/{job_id}/cancel/")
    assert response.status_code == 200
    assert response.json()["state"] == "cancelling"
    wait_for(lambda: not _alive(pid), 10, "the runner to be killed", node)
    killed_after = time.monotonic() - began
    wait_for(lambda: job_state(job_id) == "cancelled", 20, "the job to be cancelled", node)
    assert killed_after < 5.0, f"the runner lived {killed_after:.1f} s after the cancel"
    assert live_allocations(job_id) == 0

    # Its only slot is free again: the next job runs on it, and this one's runner crashes.
    crashing = submit(cluster, alice, team_a, steps=5, step_seconds=0.0, crash_at_step=3)
    wait_for(lambda: job_state(crashing) in ("succeeded", "failed"), 60, "the crashing job to end", node)
    detail = cluster.api(alice).get(f"{cluster.server}/api/v1/jobs/{crashing}/").json()
    assert detail["state"] == "failed"
    assert "exited with status 1" in detail["error"]
    events = cluster.api(alice).get(f"{cluster.server}/api/v1/jobs/{crashing}/events/").json()["results"]
    [failure] = [e for e in events if e["to_state"] == "failed"]
    assert "RuntimeError: self-test crash requested at step 3" in failure["message"]
    assert failure["data"]["stderr_tail"][0].startswith("Traceback")
    artifacts = cluster.api(alice).get(f"{cluster.server}/api/v1/jobs/{crashing}/artifacts/").json()["results"]
    assert [a["name"] for a in artifacts] == ["runner.log"]  # for the post-mortem


def test_a_preempted_job_stops_requeues_and_finishes_after_the_newcomer(cluster, alice, team_a, settings):
    # Preemption cut to seconds: self-test jobs may be preempted once they have run 2 GPU-seconds.
    settings.DEEPOPT_SCHEDULER = {**settings.DEEPOPT_SCHEDULER, "preemptible_kinds": frozenset({"selftest"}),
                                  "preempt_threshold_gpu_s": 2.0, "preempt_min_run_s": 2.0}
    node = cluster.start_node(alice, team_a, slots=1)
    long_job = submit(cluster, alice, team_a, steps=100, step_seconds=0.1)
    pid = wait_for(lambda: spawned_pid(long_job), 60, "the first runner to start", node)
    wait_for(lambda: job_state(long_job) == "running", 10, "the first job to run", node)
    time.sleep(3.0)  # past the mark and the minimum run

    began = time.monotonic()
    newcomer = submit(cluster, alice, team_a, steps=5, step_seconds=0.1)
    assert job_state(long_job) in ("preempting", "queued")  # the submit's pass preempted it
    wait_for(lambda: not _alive(pid), 10, "the preempted runner to be stopped", node)
    stopped_after = time.monotonic() - began
    wait_for(lambda: job_state(newcomer) == "succeeded", 60, "the newcomer to run and succeed", node)
    assert stopped_after < 5.0, f"the preempted runner lived {stopped_after:.1f} s"

    # The preempted job ran again, as attempt 2, once the slot was free, and succeeded.
    wait_for(lambda: job_state(long_job) == "succeeded", 60, "the preempted job to run again and succeed", node)
    job = Job.objects.get(pk=long_job)
    assert (job.attempt, job.preemptions) == (2, 1)
    assert job.ran_seconds >= 3.0
    events = cluster.api(alice).get(f"{cluster.server}/api/v1/jobs/{long_job}/events/").json()["results"]
    states = [(e["from_state"], e["to_state"]) for e in events if e["to_state"]]
    assert ("running", "preempting") in states
    assert ("preempting", "queued") in states
    [preempting] = [e for e in events if e["to_state"] == "preempting"]
    assert f"Preempted for job {newcomer} of the same team" in preempting["message"]
    runs = {r.attempt: r.status for r in AttemptRun.objects.filter(job_id=long_job)}
    assert runs == {1: "cancelled", 2: "succeeded"}
    newcomer_started = Job.objects.get(pk=newcomer).started_at
    assert newcomer_started < Job.objects.get(pk=long_job).started_at  # attempt 2 started after it


def test_a_preempted_training_job_resumes_from_the_step_it_stopped_at(cluster, alice, team_a, settings):
    settings.DEEPOPT_SCHEDULER = {**settings.DEEPOPT_SCHEDULER, "preempt_threshold_gpu_s": 2.0,
                                  "preempt_min_run_s": 2.0}
    node = cluster.start_node(alice, team_a, slots=1)
    body = {"name": "long training", "team": team_a.pk, "kind": "training", "resources": {"gpus": 1},
            "spec": {"model": "digits-mlp", "steps": 6000, "batch_size": 32}}
    response = cluster.api(alice).post(f"{cluster.server}/api/v1/jobs/", json=body)
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]

    def steps_of(attempt: int) -> list[int]:
        from apps.scheduling.models import JobEvent

        return [e.data["step"] for e in JobEvent.objects.filter(job_id=job_id, attempt=attempt, kind="progress")
                if e.data.get("type") == "step"]

    wait_for(lambda: len(steps_of(1)) > 0 and max(steps_of(1)) >= 100, 60, "the training to make progress", node)
    time.sleep(2.5)  # past the (test's) 2 GPU-second mark and minimum run
    newcomer = submit(cluster, alice, team_a, steps=5, step_seconds=0.1)
    wait_for(lambda: job_state(newcomer) == "succeeded", 60, "the newcomer to run", node)
    done_before = max(steps_of(1))

    # Attempt 2 resumes from the checkpoint the stop wrote, not from the last periodic one (every 600 steps).
    from apps.scheduling.models import JobEvent

    def resumed() -> int | None:
        event = JobEvent.objects.filter(job_id=job_id, attempt=2, kind="progress", data__type="resumed").first()
        return event.data["step"] if event is not None else None

    step = wait_for(resumed, 60, "attempt 2 to resume", node)
    assert step >= done_before, f"resumed at {step}, but attempt 1 had reported step {done_before}"
    # A bound for a stuck job, not a speed goal: the whole test takes 26 s alone on the 2-core dev
    # machine, but the training's end took over 90 s there with a CPU-bound bench running beside it.
    wait_for(lambda: job_state(job_id) in ("succeeded", "failed"), 300, "the training to finish", node)
    job = Job.objects.get(pk=job_id)
    assert (job.state, job.attempt, job.preemptions) == ("succeeded", 2, 1), job.error
    assert job.result["final_accuracy"] > 0.8  # the resumed run went on learning (chance is 0.1)


def test_a_node_killed_mid_job_loses_the_attempt_and_the_job_finishes_elsewhere(cluster, alice, team_a):
    first = cluster.start_node(alice, team_a, slots=1)
    second = cluster.start_node(alice, team_a, slots=1)
    api = cluster.api(alice)
    first_id = GpuNode.objects.get(name=first.name).pk
    assert api.post(f"{cluster.server}/api/v1/nodes/{first_id}/drain/").status_code == 200

    job_id = submit(cluster, alice, team_a, steps=30, step_seconds=0.1)
    pid = wait_for(lambda: spawned_pid(job_id), 60, "the runner to start", second)
    assert Allocation.objects.get(job_id=job_id, attempt=1).node.name == second.name
    wait_for(lambda: job_state(job_id) == "running", 10, "the job to run", second)

    second.kill9()  # agent, worker and runner: the whole node is gone, without a word
    wait_for(lambda: not _alive(pid), 5, "the runner to die")
    assert api.post(f"{cluster.server}/api/v1/nodes/{first_id}/activate/").status_code == 200

    def retried() -> bool:
        reconcile()  # what beat runs every 30 s
        return Job.objects.get(pk=job_id).attempt == 2

    wait_for(retried, 40, "the reconciler to requeue the attempt", first, second)

    def ended() -> bool:
        reconcile()
        return job_state(job_id) in ("succeeded", "failed")

    wait_for(ended, 60, "attempt 2 to finish", first)
    detail = api.get(f"{cluster.server}/api/v1/jobs/{job_id}/").json()
    assert (detail["state"], detail["attempt"]) == ("succeeded", 2), detail
    assert Allocation.objects.get(job_id=job_id, attempt=2).node.name == first.name
    events = api.get(f"{cluster.server}/api/v1/jobs/{job_id}/events/", params={"page_size": 200}).json()["results"]
    requeue = [e for e in events if e["to_state"] == "queued" and e["from_state"] == "running"]
    assert len(requeue) == 1
    # Whichever the reconciler saw first: the node's silence, its worker's, or the node already down (a worker
    # its agent restarted in the moment before the kill can still say goodbye; see NodeProcess.kill9).
    name = re.escape(second.name)
    assert re.search(f"Node {name} stopped answering|on {name} stopped reporting|Node {name} is down",
                     requeue[0]["message"])
    assert not Allocation.objects.filter(released_at__isnull=True).exists()
    wait_for(lambda: reconcile() and GpuNode.objects.get(name=second.name).state == "down", 20,
             "the silent node to be marked down")


def test_a_two_node_training_job_runs_one_rank_per_node_and_meets_at_the_rendezvous(cluster, alice, team_a):
    first = cluster.start_node(alice, team_a, slots=2)
    second = cluster.start_node(alice, team_a, slots=2)
    body = {"name": "hcof 2x2", "team": team_a.pk, "kind": "training", "resources": {"gpus": 4, "nodes": 2},
            "spec": {"model": "digits-mlp", "steps": 12, "batch_size": 32,
                     "hcof": {"intra_node": "none", "inter_node": "int4", "critical": "none"}}}
    response = cluster.api(alice).post(f"{cluster.server}/api/v1/jobs/", json=body)
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    wait_for(lambda: job_state(job_id) in ("succeeded", "failed"), 150, "the two-node job to end", first, second)

    detail = cluster.api(alice).get(f"{cluster.server}/api/v1/jobs/{job_id}/").json()
    assert detail["state"] == "succeeded", detail["error"]
    result = detail["result"]
    assert result["world_size"] == 4
    assert {n["name"] for n in result["topology"]["nodes"]} == {first.name, second.name}
    assert result["bytes_by_level"]["inter_node"] > 0  # the ranks did talk across the two nodes
    runs = AttemptRun.objects.filter(job_id=job_id, attempt=1).order_by("rank")
    # Rank 1 reports its own end, which may come a moment after rank 0's ended the job.
    wait_for(lambda: not runs.filter(finished_at__isnull=True).exists(), 30, "rank 1 to report", first, second)
    assert [(r.rank, r.status) for r in runs] == [(0, "succeeded"), (1, "succeeded")]
    assert {r.node.name for r in runs} == {first.name, second.name}
    assert live_allocations(job_id) == 0


def test_a_node_stopped_mid_job_hands_the_attempt_back_at_once(cluster, alice, team_a):
    node = cluster.start_node(alice, team_a, slots=1)
    job_id = submit(cluster, alice, team_a, steps=600, step_seconds=0.1)
    pid = wait_for(lambda: spawned_pid(job_id), 60, "the runner to start", node)
    wait_for(lambda: job_state(job_id) == "running", 10, "the job to run", node)

    began = time.monotonic()
    node.stop()  # SIGTERM, as Ctrl-C of make run or `docker stop` sends: a warm shutdown
    wait_for(lambda: not _alive(pid), 5, "the runner to die")
    job = Job.objects.get(pk=job_id)
    assert (job.state, job.attempt) == ("queued", 2), "the worker should report the attempt interrupted"
    assert time.monotonic() - began < 30
    event = job.events.get(to_state="queued", from_state="running")
    assert "shut down during attempt 1" in event.message
    assert "(try 1 of 3;" in event.message  # a shutdown is the cluster's doing: it used up no attempt
    assert live_allocations(job_id) == 0
    # The node said it was going: it is down, so the retry waits for a node instead of landing on it.
    assert GpuNode.objects.get(name=node.name).state == "down"


class PrivateRedis:
    """A redis-server of this test's own, which it may stop and start again (not the shared one)."""

    def __init__(self, directory: Path) -> None:
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.directory, self.process = directory, None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redis

        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.directory)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: _pings(redis, self.url), 15, "the private redis-server")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def _pings(redis, url: str) -> bool:  # noqa: ANN001
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


@pytest.fixture
def private_redis(tmp_path):
    import shutil

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.stop()


def test_a_redis_restart_loses_no_job(cluster_on, private_redis, alice, team_a, settings):
    cluster = cluster_on(private_redis.url)
    settings.DEEPOPT_WORKERS = {**settings.DEEPOPT_WORKERS, "start_timeout_s": 3.0}
    node = cluster.start_node(alice, team_a, slots=2)
    running = submit(cluster, alice, team_a, steps=60, step_seconds=0.1)
    wait_for(lambda: spawned_pid(running), 60, "the first job to start", node)

    private_redis.stop()  # no persistence: every message in it is gone
    waiting = submit(cluster, alice, team_a, steps=5, step_seconds=0.0)
    assert job_state(waiting) == "allocated"  # placed, but its message could not be sent
    private_redis.start()

    # The running job reports over HTTP, not Redis: it finishes undisturbed.
    wait_for(lambda: job_state(running) in ("succeeded", "failed"), 60, "the running job to end", node)
    assert Job.objects.values_list("state", "attempt").get(pk=running) == ("succeeded", 1)

    def finished() -> bool:
        reconcile()  # sends the allocated job again once start_timeout_s has passed
        return job_state(waiting) in ("succeeded", "failed")

    wait_for(finished, 60, "the job whose message was lost to run", node)
    assert Job.objects.values_list("state", "attempt").get(pk=waiting) == ("succeeded", 1)
    assert Job.objects.get(pk=waiting).events.filter(kind="note", message__contains="again").exists()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_compression_job_compresses_the_teams_uploaded_weights_and_refuses_weights_of_another_shape(
        cluster, alice, team_a):
    """The whole path of a team's own model: uploaded through the API (safetensors, checked), named by a job's
    spec.weights, fetched by the worker from the web app, compressed by the runner; weights that do not fit
    the architecture fail the job at once, saying so."""
    import torch
    from safetensors.torch import save

    from workers.compression.models import make_task

    node = cluster.start_node(alice, team_a)
    api = cluster.api(alice)
    trained = make_task("digits-cnn").model  # the catalog's trained CNN, cached after its first training
    state = {k: v.detach().contiguous() for k, v in trained.state_dict().items()}

    def upload(tensors: dict, name: str) -> int:
        response = api.post(f"{cluster.server}/api/v1/models/", data={"arch": "digits-cnn", "team": team_a.pk},
                            files={"file": (name, save(tensors))})
        assert response.status_code == 201, response.text
        return response.json()["id"]

    def compress(weights: int) -> int:
        body = {"name": "mine", "team": team_a.pk, "kind": "compression", "resources": {"gpus": 1},
                "spec": {"model": "digits-cnn", "weights": weights, "quantization": {"mode": "preset"}}}
        response = api.post(f"{cluster.server}/api/v1/jobs/", json=body)
        assert response.status_code == 201, response.text
        return response.json()["id"]

    good = compress(upload(state, "digits-mine.safetensors"))
    wrong = {**state, "features.0.weight": torch.zeros(3, 1, 3, 3)}  # one tensor of another shape
    bad = compress(upload(wrong, "digits-wrong.safetensors"))
    wait_for(lambda: all(job_state(j) in ("succeeded", "failed", "cancelled") for j in (good, bad)), 120,
             "both jobs to end", node)

    done = api.get(f"{cluster.server}/api/v1/jobs/{good}/").json()
    assert done["state"] == "succeeded", done
    result = done["result"]
    assert result["model"].startswith("upload:")
    assert result["arch"] == "digits-cnn"
    assert result["baseline"]["quality"] > 90  # the uploaded weights are the trained ones: top-1 in percent
    failed = api.get(f"{cluster.server}/api/v1/jobs/{bad}/").json()
    assert failed["state"] == "failed", failed
    assert "do not match architecture 'digits-cnn'" in json.dumps(failed)
    assert not list(Path(node.work_dir).rglob("weights.safetensors"))  # fetched weights are not left behind
