"""The live pass: the policy core fed from the database, decisions applied in one transaction."""
from __future__ import annotations

import pytest

from apps.cluster.models import GpuNode
from apps.cluster.services import set_node_state
from apps.scheduling.live import run_pass
from apps.scheduling.models import Allocation, Job, QueueEntry
from tests.conftest import COMPRESSION_JOB

pytestmark = pytest.mark.django_db


def submit(client, team, gpus: int, name: str = "job", **extra) -> int:
    payload = {**COMPRESSION_JOB, "name": name, "team": team.pk, "resources": {"gpus": gpus}, **extra}
    response = client.post("/api/v1/jobs/", payload, format="json")
    assert response.status_code == 201, response.content
    return response.json()["id"]


def test_a_pass_places_what_fits_and_explains_what_waits(alice, team_a, node_a, client_for):
    client = client_for(alice)
    first, second, third = (submit(client, team_a, 4, f"j{i}") for i in range(3))
    result = run_pass()
    assert sorted(result.placed) == sorted([first, second])
    assert {j.pk: j.state for j in Job.objects.all()} == {first: "allocated", second: "allocated", third: "queued"}
    live = Allocation.objects.filter(released_at__isnull=True)
    gpus_of = {job: set(live.filter(job_id=job).values_list("gpu_id", flat=True)) for job in (first, second)}
    assert len(gpus_of[first]) == len(gpus_of[second]) == 4
    assert not gpus_of[first] & gpus_of[second]
    entry = QueueEntry.objects.get(job_id=third)
    assert entry.position == 1
    assert entry.flow.endswith("/compression")
    assert entry.reason
    assert Job.objects.select_related("queue_entry").get(pk=third).waiting_reason == entry.reason
    detail = client.get(f"/api/v1/jobs/{third}/").json()
    assert detail["queue"]["position"] == 1
    assert detail["queue"]["reason"] == entry.reason
    # The job's own pending_reason, in the detail and the list, is the latest pass's (its queue row's).
    assert detail["pending_reason"] == entry.reason
    listed = {j["id"]: j for j in client.get("/api/v1/jobs/").json()["results"]}
    assert listed[third]["pending_reason"] == entry.reason
    assert listed[first]["pending_reason"] == ""


def test_a_job_that_starts_leaves_the_queue_view(alice, team_a, node_a, client_for):
    client = client_for(alice)
    job = submit(client, team_a, 8)
    waiting = submit(client, team_a, 8)
    run_pass()
    assert QueueEntry.objects.filter(job_id=waiting).exists()
    client.post(f"/api/v1/jobs/{waiting}/cancel/")
    run_pass()
    assert not QueueEntry.objects.filter(job_id=waiting).exists()
    assert Job.objects.get(pk=job).state == "allocated"


def test_a_draining_node_gets_nothing_new(alice, team_a, node_a, client_for):
    set_node_state(node_a, GpuNode.State.DRAINING)
    job = submit(client_for(alice), team_a, 1)
    assert run_pass().placed == []
    assert Job.objects.get(pk=job).state == "queued"
    set_node_state(node_a, GpuNode.State.ACTIVE)
    assert run_pass().placed == [job]


def test_a_team_never_holds_more_than_max_gpus(charlie, team_b, node_a, node_b, client_for):
    client = client_for(charlie)
    jobs = [submit(client, team_b, 2, f"b{i}") for i in range(4)]  # team B: max_gpus 4, 12 GPUs free
    run_pass()
    held = Allocation.objects.filter(job__team=team_b, released_at__isnull=True).count()
    assert held == 4
    waiting = [j for j in jobs if Job.objects.get(pk=j).state == "queued"]
    assert len(waiting) == 2
    assert "4/4" in QueueEntry.objects.get(job_id=waiting[0]).reason


def test_the_queue_endpoint_shows_only_the_callers_teams(alice, charlie, team_a, team_b, node_a, client_for):
    submit(client_for(alice), team_a, 8, "a-big")
    submit(client_for(alice), team_a, 8, "a-waits")
    run_pass()
    mine = client_for(alice).get("/api/v1/queue/").json()
    assert [row["job"]["name"] for row in mine["results"]] == ["a-waits"]
    row = mine["results"][0]
    assert {"position", "flow", "finish_tag", "reason", "eta"} <= set(row)
    assert client_for(charlie).get("/api/v1/queue/").json()["count"] == 0


def test_the_queue_page_and_job_page_show_position_and_reason(alice, charlie, team_a, node_a, client_for, client):
    client_api = client_for(alice)
    submit(client_api, team_a, 8, "a-big")
    waiting = submit(client_api, team_a, 8, "a-waits")
    run_pass()
    reason = QueueEntry.objects.get(job_id=waiting).reason
    client.force_login(alice)
    page = client.get("/queue/").content.decode()
    assert "a-waits" in page
    assert reason.split(";")[0] in page
    detail = client.get(f"/jobs/{waiting}/").content.decode()
    assert "#1 in the queue." in detail
    client.force_login(charlie)
    assert "a-waits" not in client.get("/queue/").content.decode()


def test_a_later_pass_rewrites_the_queue_rows_that_changed(alice, team_a, node_a, client_for):
    from apps.scheduling.services import cancel_job

    client = client_for(alice)
    first, second, third = (submit(client, team_a, 8, f"j{i}") for i in range(3))
    run_pass()
    assert dict(QueueEntry.objects.values_list("job_id", "position")) == {second: 1, third: 2}
    before = QueueEntry.objects.get(job_id=third)
    cancel_job(Job.objects.get(pk=second), actor=alice)
    run_pass()
    after = QueueEntry.objects.get(job_id=third)
    assert dict(QueueEntry.objects.values_list("job_id", "position")) == {third: 1}
    assert after.updated_at > before.updated_at
    assert after.flow == before.flow
    assert after.reason


def test_etas_are_written_after_the_pass_from_its_snapshot(alice, team_a, node_a, client_for):
    from datetime import timedelta

    from django.utils import timezone

    client = client_for(alice)
    running = submit(client, team_a, 8, "runs", walltime_minutes=60)
    waiting = submit(client, team_a, 8, "waits")
    before = timezone.now()
    result = run_pass(with_etas=True)
    assert result.placed == [running]
    assert result.etas is True
    assert result.eta_ms is not None
    eta = QueueEntry.objects.get(job_id=waiting).eta
    # It waits for the running job's walltime (60 minutes), counted from the pass.
    assert before + timedelta(minutes=59) <= eta <= timezone.now() + timedelta(minutes=61)
    assert client.get("/api/v1/queue/").json()["results"][0]["eta"] is not None


def test_etas_of_an_older_pass_do_not_overwrite_a_newer_one(alice, team_a, node_a, client_for, monkeypatch):
    """A pass whose ETA forecast finishes after a newer pass wrote the queue leaves the queue alone."""
    from datetime import timedelta

    from django.utils import timezone

    import apps.scheduling.live as live

    client = client_for(alice)
    submit(client, team_a, 8, "runs", walltime_minutes=60)
    waiting = submit(client, team_a, 8, "waits")
    run_pass(with_etas=False)
    assert QueueEntry.objects.get(job_id=waiting).eta is None
    real_forecast = live.policy.forecast_etas

    def newer_pass_meanwhile(*args, **kwargs):
        QueueEntry.objects.filter(job_id=waiting).update(updated_at=timezone.now() + timedelta(seconds=5))
        return real_forecast(*args, **kwargs)

    monkeypatch.setattr(live.policy, "forecast_etas", newer_pass_meanwhile)
    run_pass(with_etas=True)
    assert QueueEntry.objects.get(job_id=waiting).eta is None


def test_a_queued_job_is_stamped_once_and_the_next_pass_keeps_its_tags(alice, team_a, node_a, client_for):
    """As in a replay: tags are handed from pass to pass (queue rows and SchedulerState), not made afresh."""
    from apps.scheduling.models import SchedulerState
    from apps.scheduling.services import transition

    client = client_for(alice)
    first = submit(client, team_a, 8, "runs", walltime_minutes=60)
    second = submit(client, team_a, 8, "waits", walltime_minutes=120)
    assert run_pass().placed == [first]
    stamped = QueueEntry.objects.get(job_id=second)
    assert stamped.estimate_s == 120 * 60
    assert stamped.finish_tag > stamped.start_tag
    state = SchedulerState.objects.get(pk=1)
    assert state.flow_finish[f"{team_a.pk}:compression"] == stamped.finish_tag

    third = submit(client, team_a, 8, "after", walltime_minutes=30)
    run_pass()
    again = QueueEntry.objects.get(job_id=second)
    assert (again.start_tag, again.finish_tag, again.estimate_s) == (
        stamped.start_tag, stamped.finish_tag, stamped.estimate_s)
    behind = QueueEntry.objects.get(job_id=third)
    assert behind.start_tag == stamped.finish_tag  # WFQ: a flow's next job starts where its last one finished

    # The first job ends and the second starts: the third keeps the tags it was stamped with, where a pass
    # that stamped afresh would put it at the front of virtual time again.
    transition(first, Job.State.RUNNING)
    transition(first, Job.State.SUCCEEDED)
    assert run_pass().placed == [second]
    kept = QueueEntry.objects.get(job_id=third)
    assert (kept.start_tag, kept.finish_tag) == (behind.start_tag, behind.finish_tag)
    assert SchedulerState.objects.get(pk=1).virtual_time == kept.start_tag
