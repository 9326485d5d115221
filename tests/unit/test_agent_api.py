"""The agent API as a node's agent and worker meet it: node-token auth, registration, heartbeats, and the
idempotent reports of a job attempt (progress, status, result, artifacts), and the team-scoped download.

Jobs are put on GPUs with the same writes the scheduling pass makes (Allocation rows, then `allocated`),
so these tests do not depend on where the policy would place them."""
from __future__ import annotations

import hashlib
import os
import stat
from io import StringIO

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import call_command
from rest_framework.test import APIClient

from apps.cluster.models import Gpu, GpuNode, MetricSample, hash_node_token
from apps.cluster.services import register_node, set_node_state
from apps.scheduling.models import Allocation, AttemptRun, Job, JobArtifact, JobEvent
from apps.scheduling.services import cancel_job, submit_job, transition
from apps.scheduling.states import JobState

pytestmark = pytest.mark.django_db


def node_client(token: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Node {token}")
    return client


@pytest.fixture
def node_one(team_a):
    node, token = register_node(team=team_a, name="gpu-one", hostname="one.example", rack="r1",
                                gpus=[{"index": i, "model": "NVIDIA H200", "memory_mb": 143_771} for i in range(4)])
    return node, token


@pytest.fixture
def node_two(team_b):
    node, token = register_node(team=team_b, name="gpu-two", hostname="two.example", rack="r2",
                                gpus=[{"index": i, "model": "NVIDIA H200", "memory_mb": 143_771} for i in range(4)])
    return node, token


def allocate(job: Job, *placements: tuple[GpuNode, list[int]]) -> Job:
    """What the scheduling pass writes for a placement: one Allocation per GPU, then `allocated`."""
    for node, indexes in placements:
        for index in indexes:
            Allocation.objects.create(job=job, attempt=job.attempt, gpu=Gpu.objects.get(node=node, index=index),
                                      node=node)
    return transition(job, JobState.ALLOCATED, expected_attempt=job.attempt, message="test placement")


@pytest.fixture
def selftest_job(alice, team_a):
    return submit_job(submitter=alice, team=team_a, name="self-test", kind="selftest", gpus=1,
                      spec={"steps": 3, "step_seconds": 0.0, "crash_at_step": None})


@pytest.fixture
def running(selftest_job, node_one):
    """The self-test job allocated on gpu-one and claimed by a worker run: the usual state of a report."""
    node, token = node_one
    allocate(selftest_job, (node, [1]))
    answer = node_client(token).post(f"/api/v1/agent/jobs/{selftest_job.pk}/attempts/1/progress/",
                                     {"run": "run-aaaaaaaa", "seq": 1, "lines": []}, format="json")
    assert answer.status_code == 200, answer.content
    selftest_job.refresh_from_db()
    return selftest_job, node, token


def url(job: Job, attempt: int, what: str = "") -> str:
    return f"/api/v1/agent/jobs/{job.pk}/attempts/{attempt}/" + (f"{what}/" if what else "")


# --- who may call what ----------------------------------------------------------------------

def test_a_node_token_reaches_the_agent_api(node_one):
    node, token = node_one
    response = node_client(token).post("/api/v1/agent/heartbeat/", {"host": {"cpu_percent": 12.5}}, format="json")
    assert response.status_code == 200, response.content
    assert response.json()["name"] == "gpu-one"
    assert response.json()["queue"] == "node.gpu-one"


@pytest.mark.parametrize("path", ["/api/v1/jobs/", "/api/v1/nodes/", "/api/v1/me/", "/api/v1/queue/"])
def test_a_node_token_is_refused_outside_the_agent_api(node_one, path):
    _, token = node_one
    assert node_client(token).get(path).status_code == 401


def test_a_users_token_is_refused_by_the_agent_api(alice, client_for, node_one):
    response = client_for(alice).post("/api/v1/agent/heartbeat/", {}, format="json")
    assert response.status_code == 401
    assert response["WWW-Authenticate"] == "Node"


def test_an_unknown_node_token_is_a_401(node_one):
    assert node_client("dn_not-a-token").post("/api/v1/agent/heartbeat/", {}, format="json").status_code == 401


# --- registration and heartbeats ----------------------------------------------------------------

def test_registration_makes_the_inventory_what_the_agent_found(node_one):
    node, token = node_one
    gpus = [{"index": 0, "model": "NVIDIA A100", "memory_mb": 81_920, "uuid": "GPU-0"},
            {"index": 1, "model": "NVIDIA A100", "memory_mb": 81_920, "uuid": "GPU-1"}]
    response = node_client(token).post("/api/v1/agent/register/", {"device_type": "gpu", "gpus": gpus,
                                                                    "hostname": "ignored.example"}, format="json")
    assert response.status_code == 200, response.content
    assert list(node.gpus.order_by("index").values_list("index", "model", "uuid")) == [
        (0, "NVIDIA A100", "GPU-0"), (1, "NVIDIA A100", "GPU-1")]
    assert response.json()["artifact_max_bytes"] > 0
    node.refresh_from_db()
    assert node.hostname == "one.example"  # the registered address stays: other nodes rendezvous on it
    assert node.last_heartbeat_at is not None


def test_a_host_without_gpus_registers_cpu_slots(node_one):
    node, token = node_one
    slots = [{"index": i, "model": "CPU slot", "memory_mb": 4096} for i in range(2)]
    response = node_client(token).post("/api/v1/agent/register/", {"device_type": "cpu", "gpus": slots},
                                       format="json")
    assert response.status_code == 200, response.content
    node.refresh_from_db()
    assert node.device_type == GpuNode.DeviceType.CPU
    assert node.gpus.count() == 2


def test_registration_keeps_a_missing_gpu_that_has_allocation_history(node_one, selftest_job):
    node, token = node_one
    allocate(selftest_job, (node, [3]))
    response = node_client(token).post("/api/v1/agent/register/", {
        "device_type": "gpu", "gpus": [{"index": 0, "model": "NVIDIA H200", "memory_mb": 143_771}]}, format="json")
    assert response.status_code == 200, response.content
    assert sorted(node.gpus.values_list("index", flat=True)) == [0, 3]
    assert "GPU 3" in response.json()["notes"][0]


def test_registration_refuses_an_empty_or_duplicated_inventory(node_one):
    _, token = node_one
    client = node_client(token)
    assert client.post("/api/v1/agent/register/", {"device_type": "gpu", "gpus": []}, format="json").status_code == 400
    twice = [{"index": 0, "model": "x", "memory_mb": 1}, {"index": 0, "model": "x", "memory_mb": 1}]
    assert client.post("/api/v1/agent/register/", {"device_type": "gpu", "gpus": twice},
                       format="json").status_code == 400


def test_a_heartbeat_stores_one_sample_per_gpu_and_one_for_the_host(node_one):
    node, token = node_one
    body = {"host": {"cpu_percent": 37.5, "memory_used_mb": 1000, "memory_total_mb": 4000},
            "gpus": [{"index": i, "utilization": 10.0 * i, "memory_used_mb": 100 * i, "memory_total_mb": 143_771,
                      "temperature_c": 40 + i, "power_w": 100.5 + i} for i in range(4)]}
    assert node_client(token).post("/api/v1/agent/heartbeat/", body, format="json").status_code == 200
    samples = MetricSample.objects.filter(node=node)
    assert samples.count() == 5
    host = samples.get(gpu_index=None)
    assert (host.utilization, host.memory_used_mb, host.memory_total_mb) == (37.5, 1000, 4000)
    gpu3 = samples.get(gpu_index=3)
    assert (gpu3.utilization, gpu3.temperature_c, gpu3.power_w) == (30.0, 43.0, 103.5)
    node.refresh_from_db()
    assert node.last_heartbeat_at == host.ts


@pytest.mark.parametrize(("body", "field"), [
    ({"gpus": [{"index": 0, "utilization": 250.0}]}, "gpus.0.utilization"),
    ({"gpus": [{"index": 0, "power_w": "a lot"}]}, "gpus.0.power_w"),
    ({"gpus": [{"index": 0, "memory_used_mb": 2**40}]}, "gpus.0.memory_used_mb"),
    ({"gpus": [{"index": 0, "memory_used_mb": 1.5}]}, "gpus.0.memory_used_mb"),
    ({"gpus": [{"index": 0}, {"index": 0}]}, "gpus.1.index"),
    ({"gpus": [{"index": True}]}, "gpus.0.index"),
    ({"gpus": {"index": 0}}, "gpus"),
    ({"host": {"cpu_percent": -1}}, "host.cpu_percent"),
    ({"host": "busy"}, "host"),
])
def test_a_heartbeat_with_a_bad_reading_is_a_400_and_stores_nothing(node_one, body, field):
    node, token = node_one
    response = node_client(token).post("/api/v1/agent/heartbeat/", body, format="json")
    assert response.status_code == 400
    assert field in response.json()
    assert not MetricSample.objects.filter(node=node).exists()


def test_a_down_node_that_heartbeats_again_is_active_but_a_drained_one_stays_drained(node_one, node_two):
    down, down_token = node_one
    drained, drained_token = node_two
    set_node_state(down, GpuNode.State.DOWN)
    set_node_state(drained, GpuNode.State.DRAINING)
    assert node_client(down_token).post("/api/v1/agent/heartbeat/", {}, format="json").json()["state"] == "active"
    assert node_client(drained_token).post("/api/v1/agent/heartbeat/", {},
                                           format="json").json()["state"] == "draining"


def test_a_node_going_offline_is_down_until_it_registers_again(node_one, node_two):
    (_, token), (drained, drained_token) = node_one, node_two
    set_node_state(drained, GpuNode.State.DRAINING)
    assert node_client(token).post("/api/v1/agent/offline/").json()["state"] == "down"
    assert node_client(drained_token).post("/api/v1/agent/offline/").json()["state"] == "draining"
    slots = [{"index": 0, "model": "CPU slot", "memory_mb": 1024}]
    answer = node_client(token).post("/api/v1/agent/register/", {"device_type": "cpu", "gpus": slots},
                                     format="json")
    assert answer.json()["state"] == "active"


# --- progress -------------------------------------------------------------------------------------

def test_the_first_progress_report_starts_the_attempt_and_lines_become_events(selftest_job, node_one):
    node, token = node_one
    allocate(selftest_job, (node, [1]))
    lines = [{"type": "step", "step": 1, "steps": 3, "estimate": 1.1}, {"type": "step", "step": 2, "steps": 3}]
    response = node_client(token).post(url(selftest_job, 1, "progress"),
                                       {"run": "run-aaaaaaaa", "seq": 1, "pid": 4242, "lines": lines}, format="json")
    assert response.status_code == 200, response.content
    assert response.json() == {"status": "accepted", "state": "running", "stop": False, "reason": ""}
    selftest_job.refresh_from_db()
    assert selftest_job.state == JobState.RUNNING
    assert selftest_job.started_at is not None
    progress = list(selftest_job.events.filter(kind=JobEvent.Kind.PROGRESS).order_by("id"))
    assert [e.data for e in progress] == lines
    assert progress[0].message == "step 1/3, estimate 1.1"
    run = AttemptRun.objects.get(job=selftest_job, attempt=1, rank=0)
    assert (run.run_id, run.pid, run.last_seq, run.node_id) == ("run-aaaaaaaa", 4242, 1, node.pk)


def test_a_repeated_progress_report_changes_nothing(running):
    job, _, token = running
    body = {"run": "run-aaaaaaaa", "seq": 2, "lines": [{"step": 1}]}
    first = node_client(token).post(url(job, 1, "progress"), body, format="json")
    events = job.events.count()
    again = node_client(token).post(url(job, 1, "progress"), body, format="json")
    assert first.json()["status"] == "accepted"
    assert again.status_code == 200
    assert again.json()["status"] == "ignored"
    assert job.events.count() == events


def test_a_second_delivery_of_the_same_attempt_may_not_run_it(running):
    job, _, token = running
    response = node_client(token).post(url(job, 1, "progress"), {"run": "run-bbbbbbbb", "seq": 1}, format="json")
    assert response.status_code == 409
    assert response.json()["stop"] is True
    assert AttemptRun.objects.get(job=job).run_id == "run-aaaaaaaa"


def test_another_nodes_token_cannot_report_on_the_job(running, node_two):
    job, _, _ = running
    _, other = node_two
    client = node_client(other)
    for what, body in (("progress", {"run": "run-cccccccc", "seq": 5}),
                       ("result", {"run": "run-cccccccc", "status": "failed"})):
        assert client.post(url(job, 1, what), body, format="json").status_code == 404
    upload = SimpleUploadedFile("x.txt", b"x")
    assert client.post(url(job, 1, "artifacts"), {"run": "run-cccccccc", "file": upload},
                       format="multipart").status_code == 404
    assert client.get(url(job, 1)).status_code == 404
    job.refresh_from_db()
    assert job.state == JobState.RUNNING
    assert job.error == ""


def test_a_report_about_a_job_that_does_not_exist_is_a_404(node_one):
    _, token = node_one
    response = node_client(token).post("/api/v1/agent/jobs/999999/attempts/1/progress/",
                                       {"run": "run-aaaaaaaa", "seq": 1}, format="json")
    assert response.status_code == 404


def test_progress_of_a_cancelling_job_asks_the_worker_to_stop(running, alice):
    job, _, token = running
    cancel_job(job, actor=alice)
    response = node_client(token).post(url(job, 1, "progress"), {"run": "run-aaaaaaaa", "seq": 2}, format="json")
    assert response.json()["stop"] is True


# --- results --------------------------------------------------------------------------------------

def test_a_succeeded_result_ends_the_job_with_the_runners_json_and_releases_the_gpus(running):
    job, _, token = running
    result = {"type": "final", "pi": 3.14159265, "abs_error": 1e-9}
    response = node_client(token).post(url(job, 1, "result"), {"run": "run-aaaaaaaa", "status": "succeeded",
                                                               "result": result, "exit_code": 0}, format="json")
    assert response.status_code == 200, response.content
    job.refresh_from_db()
    assert job.state == JobState.SUCCEEDED
    assert job.result == result
    assert not Allocation.objects.filter(job=job, released_at__isnull=True).exists()


def test_a_repeated_result_changes_nothing(running):
    job, _, token = running
    body = {"run": "run-aaaaaaaa", "status": "succeeded", "result": {"n": 1}}
    node_client(token).post(url(job, 1, "result"), body, format="json")
    job.refresh_from_db()
    before = (job.state, job.result, job.finished_at, job.events.count())
    again = node_client(token).post(url(job, 1, "result"), {**body, "status": "failed", "result": {"n": 2}},
                                    format="json")
    assert again.status_code == 200
    assert again.json()["status"] == "ignored"
    job.refresh_from_db()
    assert (job.state, job.result, job.finished_at, job.events.count()) == before


def test_a_stale_attempts_reports_change_nothing(running, node_one):
    job, node, token = running
    transition(job, JobState.QUEUED, expected_attempt=1, message="requeued for the test")
    allocate(job, (node, [2]))
    job.refresh_from_db()
    assert job.attempt == 2
    client = node_client(token)
    for what, body in (("progress", {"run": "run-aaaaaaaa", "seq": 9, "lines": [{"step": 9}]}),
                       ("result", {"run": "run-aaaaaaaa", "status": "failed", "error": "late"})):
        response = client.post(url(job, 1, what), body, format="json")
        assert response.status_code == 200
        assert response.json()["status"] == "ignored"
        assert "stale" in response.json()["reason"]
    job.refresh_from_db()
    assert (job.state, job.attempt, job.error) == (JobState.ALLOCATED, 2, "")
    assert not job.events.filter(kind=JobEvent.Kind.PROGRESS, attempt=1, data__step=9).exists()


def test_a_failed_result_keeps_the_last_lines_of_stderr_in_the_events(running):
    job, _, token = running
    tail = ["Traceback (most recent call last):", '  File "x.py", line 1', "RuntimeError: boom"]
    node_client(token).post(url(job, 1, "result"), {"run": "run-aaaaaaaa", "status": "failed", "exit_code": 1,
                                                    "error": "The runner exited with status 1.",
                                                    "stderr_tail": tail}, format="json")
    job.refresh_from_db()
    assert job.state == JobState.FAILED
    event = job.events.get(to_state=JobState.FAILED)
    assert "RuntimeError: boom" in event.message
    assert event.data["stderr_tail"] == tail
    assert "RuntimeError: boom" in job.error


def test_a_cancelled_run_ends_a_cancelling_job_as_cancelled(running, alice):
    job, _, token = running
    cancel_job(job, actor=alice)
    node_client(token).post(url(job, 1, "result"), {"run": "run-aaaaaaaa", "status": "cancelled", "exit_code": -15},
                            format="json")
    job.refresh_from_db()
    assert job.state == JobState.CANCELLED
    assert not Allocation.objects.filter(job=job, released_at__isnull=True).exists()


def test_an_interrupted_run_is_retried_as_the_next_attempt(running):
    job, _, token = running
    node_client(token).post(url(job, 1, "result"), {"run": "run-aaaaaaaa", "status": "interrupted"}, format="json")
    job.refresh_from_db()
    assert (job.state, job.attempt) == (JobState.QUEUED, 2)


def test_rank_0_ends_a_multi_node_job_and_another_ranks_success_only_notes_it(selftest_job, node_one, node_two):
    (one, one_token), (two, two_token) = node_one, node_two
    allocate(selftest_job, (one, [0]), (two, [0]))
    node_client(one_token).post(url(selftest_job, 1, "progress"), {"run": "run-rank0-aa", "seq": 1}, format="json")
    node_client(two_token).post(url(selftest_job, 1, "progress"), {"rank": 1, "run": "run-rank1-bb", "seq": 1},
                                format="json")
    node_client(two_token).post(url(selftest_job, 1, "result"), {"rank": 1, "run": "run-rank1-bb",
                                                                 "status": "succeeded"}, format="json")
    selftest_job.refresh_from_db()
    assert selftest_job.state == JobState.RUNNING
    node_client(one_token).post(url(selftest_job, 1, "result"), {"run": "run-rank0-aa", "status": "succeeded",
                                                                 "result": {"ok": True}}, format="json")
    selftest_job.refresh_from_db()
    assert (selftest_job.state, selftest_job.result) == (JobState.SUCCEEDED, {"ok": True})


# --- status polls ---------------------------------------------------------------------------------

def test_the_status_poll_says_continue_then_stop_after_a_cancel(running, alice):
    job, _, token = running
    client = node_client(token)
    item = {"job": job.pk, "attempt": 1, "rank": 0, "run": "run-aaaaaaaa"}
    first = client.post("/api/v1/agent/attempts/", {"attempts": [item]}, format="json").json()["attempts"][0]
    assert (first["action"], first["state"]) == ("continue", "running")
    assert AttemptRun.objects.get(job=job).seen_at is not None
    cancel_job(job, actor=alice)
    second = client.post("/api/v1/agent/attempts/", {"attempts": [item]}, format="json").json()["attempts"][0]
    assert (second["action"], second["reason"]) == ("stop", "cancel requested")


def test_the_status_poll_tells_nothing_about_another_nodes_jobs(running, node_two):
    job, _, _ = running
    _, other = node_two
    answer = node_client(other).post("/api/v1/agent/attempts/", {"attempts": [{"job": job.pk, "attempt": 1}]},
                                     format="json").json()["attempts"][0]
    assert answer["action"] == "stop"
    assert answer["state"] is None


def test_a_nul_byte_in_a_runners_output_is_stored_replaced_not_refused(running):
    """PostgreSQL's text and jsonb hold no NUL (a 500 there); refusing it instead would lose the report, and
    a refused result is never reported at all."""
    job, _, token = running
    progress = node_client(token).post(url(job, 1, "progress"), {
        "run": "run-aaaaaaaa", "seq": 2, "lines": [{"type": "log", "message": "a\x00b", "k\x00": ["c\x00"]}]},
        format="json")
    assert progress.status_code == 200, progress.content
    event = JobEvent.objects.filter(job=job, kind="progress").latest("id")
    assert event.data == {"type": "log", "message": "a\ufffdb", "k\ufffd": ["c\ufffd"]}
    result = node_client(token).post(url(job, 1, "result"), {
        "run": "run-aaaaaaaa", "status": "failed", "error": "boom\x00", "stderr_tail": ["x\x00y"],
        "result": {"note": "z\x00"}}, format="json")
    assert result.status_code == 200, result.content
    job.refresh_from_db()
    assert job.state == JobState.FAILED
    assert "boom\ufffd" in job.error


# --- artifacts ------------------------------------------------------------------------------------

def upload(token: str, job: Job, name: str, content: bytes, attempt: int = 1):  # noqa: ANN201
    return node_client(token).post(url(job, attempt, "artifacts"), {
        "run": "run-aaaaaaaa", "name": name, "file": SimpleUploadedFile(name, content)}, format="multipart")


@pytest.fixture
def media(settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path / "media"
    return settings.MEDIA_ROOT


def test_an_artifact_is_stored_under_media_and_downloadable_by_the_jobs_team_only(
        running, media, alice, bob, charlie, dana, client_for):
    job, _, token = running
    content = b'{"pi": 3.14159}\n'
    response = upload(token, job, "selftest.json", content)
    assert response.status_code == 200, response.content
    artifact = JobArtifact.objects.get(job=job)
    assert artifact.sha256 == hashlib.sha256(content).hexdigest()
    assert artifact.file.path.startswith(str(media))

    listing = client_for(bob).get(f"/api/v1/jobs/{job.pk}/artifacts/")
    assert listing.status_code == 200
    [row] = listing.json()["results"]
    assert (row["name"], row["size"], row["attempt"]) == ("selftest.json", len(content), 1)
    for persona, status in ((alice, 200), (bob, 200), (dana, 200), (charlie, 404), (None, 401)):
        download = client_for(persona).get(f"/api/v1/jobs/{job.pk}/artifacts/{artifact.pk}/")
        assert download.status_code == status, persona
        if status == 200:
            assert b"".join(download.streaming_content) == content
            assert 'filename="selftest.json"' in download["Content-Disposition"]
    assert client_for(charlie).get(f"/api/v1/jobs/{job.pk}/artifacts/").status_code == 404


def test_the_job_page_links_its_artifacts_and_the_link_downloads_with_the_browser_session(
        running, media, bob, client):
    job, _, token = running
    content = b"\x00" * 2048
    assert upload(token, job, "model.safetensors", content).status_code == 200
    artifact = JobArtifact.objects.get(job=job)
    client.force_login(bob)
    page = client.get(f"/jobs/{job.pk}/").content.decode()
    link = f'href="/api/v1/jobs/{job.pk}/artifacts/{artifact.pk}/" download>model.safetensors</a>'
    assert link in page
    assert "2.0\xa0KB" in page  # the size, as filesizeformat writes it
    download = client.get(f"/api/v1/jobs/{job.pk}/artifacts/{artifact.pk}/")  # the session, no token
    assert download.status_code == 200
    assert b"".join(download.streaming_content) == content


def test_an_artifact_over_the_limit_is_a_413_and_nothing_is_kept(running, media, settings):
    job, _, token = running
    settings.DEEPOPT_WORKERS = {**settings.DEEPOPT_WORKERS, "artifact_max_bytes": 10}
    response = upload(token, job, "big.bin", b"x" * 11)
    assert response.status_code == 413
    assert not JobArtifact.objects.exists()
    assert not any(p.is_file() for p in media.rglob("*")) if media.exists() else True


def test_the_same_artifact_twice_is_ignored_and_a_different_one_of_that_name_is_a_409(running, media):
    job, _, token = running
    assert upload(token, job, "a.txt", b"one").json()["status"] == "accepted"
    assert upload(token, job, "a.txt", b"one").json()["status"] == "ignored"
    assert upload(token, job, "a.txt", b"two").status_code == 409
    assert JobArtifact.objects.filter(job=job).count() == 1


def test_an_artifact_name_with_a_path_is_refused(running, media):
    job, _, token = running
    assert upload(token, job, "../escape.txt", b"x").status_code == 400


# --- the local node command ----------------------------------------------------------------------

def test_ensure_local_node_registers_once_and_keeps_its_token_private(settings, tmp_path, db):
    from django.contrib.auth import get_user_model

    settings.VAR_DIR = tmp_path
    get_user_model().objects.create_superuser(username=settings.DEEPOPT_ADMIN_USER, password="x-pass-123")
    call_command("ensure_local_node", "--name", "local-9", "--slots", "3", stdout=StringIO())
    node = GpuNode.objects.get(name="local-9")
    token_file = tmp_path / "nodes" / "local-9" / "token"
    token = token_file.read_text().strip()
    assert hash_node_token(token) == node.token_hash
    assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
    assert node.team.memberships.filter(user__username=settings.DEEPOPT_ADMIN_USER, role="lead").exists()
    if node.device_type == GpuNode.DeviceType.CPU:
        assert node.gpus.count() == 3

    call_command("ensure_local_node", "--name", "local-9", stdout=StringIO())
    assert token_file.read_text().strip() == token  # still valid: reused
    token_file.write_text("dn_lost\n")
    call_command("ensure_local_node", "--name", "local-9", stdout=StringIO())
    node.refresh_from_db()
    assert hash_node_token(token_file.read_text().strip()) == node.token_hash
    assert GpuNode.objects.filter(name="local-9").count() == 1


def test_agents_are_told_to_heartbeat_at_least_three_times_per_silence_window(node_one, settings):
    _, token = node_one
    settings.DEEPOPT_WORKERS = {**settings.DEEPOPT_WORKERS, "heartbeat_interval_s": 10.0, "node_silent_s": 6.0}
    answer = node_client(token).post("/api/v1/agent/heartbeat/", {}, format="json").json()
    assert answer["heartbeat_interval_s"] == 2.0


def test_a_compression_progress_line_reads_as_its_stage_and_share():
    from apps.scheduling.reports import summarize

    assert summarize({"type": "progress", "stage": "sensitivity", "pct": 42.5}) == "sensitivity, 42.5%"
    assert summarize({"type": "step", "step": 3, "steps": 10, "loss": 0.25}) == "step 3/10, loss 0.25"
    assert summarize({"type": "final", "loss": 0.25}) == "final, loss 0.25"
    assert summarize({"type": "progress"}) == "progress"
    assert summarize({"anything": True}) == "progress"
