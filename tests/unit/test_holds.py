"""Holding a queued job (Slurm's `scontrol hold` / `release`): the scheduler starts nothing of it, says so
in the queue, and takes it up again once it is released."""
from __future__ import annotations

import pytest

from apps.scheduling.live import run_pass
from apps.scheduling.models import Job, JobEvent, QueueEntry
from tests.conftest import COMPRESSION_JOB

pytestmark = pytest.mark.django_db


def submit(client, team, **extra):  # noqa: ANN001, ANN201
    return client.post("/api/v1/jobs/", {**COMPRESSION_JOB, "team": team.pk, **extra}, format="json")


def test_a_held_job_waits_saying_who_held_it_and_starts_once_released(alice, team_a, node_a, client_for):
    client = client_for(alice)
    job_id = submit(client, team_a, name="later").json()["id"]
    other = submit(client, team_a, name="now").json()["id"]
    held = client.post(f"/api/v1/jobs/{job_id}/hold/")
    assert held.status_code == 200, held.content
    assert (held.json()["held"], held.json()["held_by"]) == (True, "alice")

    # GPUs are free for both; only the job that is not held starts.
    assert run_pass().placed == [other]
    entry = QueueEntry.objects.get(job_id=job_id)
    assert (entry.code, entry.reason) == ("held", "Held by alice: it starts only once released.")
    detail = client.get(f"/api/v1/jobs/{job_id}/").json()
    assert detail["pending_reason"] == entry.reason
    assert detail["queue"]["code"] == "held"
    assert run_pass().placed == []

    # Holding it again changes nothing and writes no second event.
    assert client.post(f"/api/v1/jobs/{job_id}/hold/").status_code == 200
    notes = list(JobEvent.objects.filter(job_id=job_id, kind="note").values_list("message", "actor__username"))
    assert notes == [("Held by alice.", "alice")]

    released = client.post(f"/api/v1/jobs/{job_id}/release/")
    assert released.status_code == 200, released.content
    assert (released.json()["held"], released.json()["held_by"]) == (False, "")
    assert run_pass().placed == [job_id]
    assert not QueueEntry.objects.filter(job_id=job_id).exists()
    assert JobEvent.objects.filter(job_id=job_id, kind="note").last().message == "Released by alice."


def test_only_a_queued_job_can_be_held_or_released_and_only_by_who_may_cancel_it(
        alice, bob, team_a, node_a, client_for):
    job_id = submit(client_for(alice), team_a).json()["id"]
    assert client_for(bob).post(f"/api/v1/jobs/{job_id}/hold/").status_code == 403  # a teammate, not its lead
    assert not Job.objects.get(pk=job_id).held
    assert run_pass().placed == [job_id]
    for verb in ("hold", "release"):
        response = client_for(alice).post(f"/api/v1/jobs/{job_id}/{verb}/")
        assert response.status_code == 409, verb
        assert response.json()["state"] == "allocated"
    assert not Job.objects.get(pk=job_id).held


def test_a_held_job_that_also_waits_for_another_says_both(alice, team_a, node_a, client_for):
    client = client_for(alice)
    first = submit(client, team_a, name="first").json()["id"]
    second = submit(client, team_a, name="second", depends_on=[first]).json()["id"]
    client.post(f"/api/v1/jobs/{second}/hold/")
    assert run_pass().placed == [first]
    entry = QueueEntry.objects.get(job_id=second)
    assert entry.code == "held"
    assert entry.reason == (f"Held by alice: it starts only once released. "
                            f"Waits for job {first} (allocated) to succeed.")
