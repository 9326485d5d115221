"""Job dependencies (Slurm's afterok): a job waits until the jobs it names have succeeded, and is
cancelled if one of them fails or is cancelled."""
from __future__ import annotations

import pytest

from apps.scheduling.live import run_pass
from apps.scheduling.models import Job, QueueEntry
from apps.scheduling.services import cancel_job, transition
from apps.scheduling.states import JobState
from tests.conftest import COMPRESSION_JOB

pytestmark = pytest.mark.django_db


def submit(client, team, **extra):  # noqa: ANN001, ANN201
    return client.post("/api/v1/jobs/", {**COMPRESSION_JOB, "team": team.pk, **extra}, format="json")


def test_a_dependent_job_waits_saying_for_what_and_starts_once_its_dependency_succeeded(
        alice, team_a, node_a, client_for):
    client = client_for(alice)
    first = submit(client, team_a, name="train").json()["id"]
    response = submit(client, team_a, name="compress after", depends_on=[first])
    assert response.status_code == 201, response.content
    second = response.json()["id"]
    assert list(Job.objects.get(pk=second).depends_on.values_list("id", flat=True)) == [first]

    # The node has GPUs for both, but only the first may start.
    assert run_pass().placed == [first]
    entry = QueueEntry.objects.get(job_id=second)
    assert (entry.code, entry.reason) == ("dependency", f"Waits for job {first} (allocated) to succeed.")
    detail = client.get(f"/api/v1/jobs/{second}/").json()
    assert detail["depends_on"] == [{"id": first, "name": "train", "state": "allocated"}]
    assert detail["queue"]["code"] == "dependency"
    assert detail["pending_reason"] == entry.reason
    queue = client.get("/api/v1/queue/").json()["results"]
    assert [(r["job"]["id"], r["code"]) for r in queue] == [(second, "dependency")]
    assert run_pass().placed == []  # still running: still held

    job = Job.objects.get(pk=first)
    transition(job, JobState.RUNNING)
    transition(job, JobState.SUCCEEDED, message="Succeeded.")
    assert run_pass().placed == [second]
    assert not QueueEntry.objects.filter(job_id=second).exists()


def test_a_dependent_job_is_cancelled_when_its_dependency_fails_or_is_cancelled(alice, team_a, node_a, client_for):
    client = client_for(alice)
    first = submit(client, team_a, name="first").json()["id"]
    second = submit(client, team_a, name="second", depends_on=[first]).json()["id"]
    third = submit(client, team_a, name="third", depends_on=[second]).json()["id"]
    cancel_job(Job.objects.get(pk=first), actor=alice)
    run_pass()
    second_job = Job.objects.get(pk=second)
    assert second_job.state == JobState.CANCELLED
    assert second_job.events.last().message == f"Cancelled: job {first}, which it waited for, ended cancelled."
    run_pass()  # and so on down the chain
    assert Job.objects.get(pk=third).state == JobState.CANCELLED


def test_dependencies_must_be_jobs_of_the_same_team_that_can_still_succeed(
        alice, charlie, dana, team_a, team_b, node_a, node_b, client_for):
    mine = submit(client_for(alice), team_a).json()["id"]
    theirs = submit(client_for(charlie), team_b).json()["id"]

    response = submit(client_for(alice), team_a, depends_on=[theirs, 999_999])
    assert response.status_code == 400
    assert response.json() == {"depends_on": [f"No job {theirs} that you can see.", "No job 999999 that you can see."]}
    # Staff see every job, but a job may wait only for its own team's.
    response = submit(client_for(dana), team_b, depends_on=[mine])
    assert response.status_code == 400
    assert response.json()["depends_on"] == [
        f"Job {mine} is not in team {team_b.name}: a job waits only for its own team's jobs."]
    cancel_job(Job.objects.get(pk=mine), actor=alice)
    response = submit(client_for(alice), team_a, depends_on=[mine])
    assert response.status_code == 400
    assert response.json()["depends_on"] == [f"Job {mine} ended cancelled: this job could never start."]
    response = submit(client_for(alice), team_a, depends_on=list(range(1, 22)))
    assert response.status_code == 400
    assert "depends_on" in response.json()
    assert Job.objects.count() == 2  # nothing was written by the refused submissions


def test_the_live_queue_update_lists_a_waiting_job_after_the_ordered_ones(
        alice, team_a, node_a, client_for, monkeypatch):
    from apps.dashboard import fanout

    heard = []
    monkeypatch.setattr(fanout, "publish", lambda groups, type_, data: heard.append((list(groups), type_, data)))
    client = client_for(alice)
    first = submit(client, team_a, name="first", resources={"gpus": 8, "nodes": 1}).json()["id"]
    second = submit(client, team_a, name="second").json()["id"]
    third = submit(client, team_a, name="third", depends_on=[first]).json()["id"]
    heard.clear()
    run_pass()  # the first takes the node's 8 GPUs; the second waits for GPUs, the third for the first
    # One update with the pass, one when its ETAs are written; both count and list the waiting job.
    team_updates = [d for _, t, d in heard if t == "queue.changed" and d["scope"] == "team"]
    assert len(team_updates) == 2
    assert [u["queued"] for u in team_updates] == [2, 2]
    assert [e["job"] for e in team_updates[1]["entries"]] == [second, third]
    team_update = team_updates[0]
    assert [(e["job"], e["position"], e["code"]) for e in team_update["entries"]] == [
        (second, 1, "max_gpus"), (third, 2, "dependency")]
    assert team_update["entries"][1]["reason"] == f"Waits for job {first} (allocated) to succeed."
    [cluster_update] = [d for _, t, d in heard if t == "queue.changed" and d["scope"] == "cluster"]
    assert cluster_update["queued"] == 2
