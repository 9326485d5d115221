"""Preemption live: the pass marks jobs `preempting`, their workers are told to stop, the result requeues
them without using up an attempt, and the reconciler finishes a preemption no worker confirmed."""
from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from apps.cluster.models import GpuNode
from apps.scheduling import reports
from apps.scheduling.live import run_pass
from apps.scheduling.models import Allocation, AttemptRun, Job, JobEvent, QueueEntry
from apps.scheduling.reconciler import reconcile
from apps.scheduling.services import cancel_job, submit_job
from apps.scheduling.states import JobState
from tests.unit.test_agent_dispatch import start

pytestmark = pytest.mark.django_db

TRAINING_SPEC = {"model": "digits-mlp", "steps": 10, "batch_size": 32}


def training(user, team, gpus: int = 8, name: str = "train") -> Job:
    return submit_job(submitter=user, team=team, name=name, kind="training", gpus=gpus, nodes=1,
                      walltime_minutes=24 * 60, spec=TRAINING_SPEC)


@pytest.fixture
def served(alice, team_a, node_a) -> Job:
    """A whole-node training job that has run for two hours (16 GPU-hours: past the 4 GPU-hour mark)."""
    job = training(alice, team_a, name="long")
    assert run_pass().placed == [job.pk]
    job.refresh_from_db()
    start(job, node_a)
    Job.objects.filter(pk=job.pk).update(started_at=timezone.now() - timedelta(hours=2))
    job.refresh_from_db()
    return job


def test_a_new_job_preempts_a_served_one_which_requeues_and_yields(served, charlie, team_b, node_a):
    newcomer = training(charlie, team_b, gpus=4, name="short")
    result = run_pass()
    assert result.preempted == [served.pk]
    assert result.placed == []  # its GPUs are not free until the worker confirms
    served.refresh_from_db()
    assert served.state == JobState.PREEMPTING
    event = served.events.get(to_state=JobState.PREEMPTING)
    # Another team's job: neither side's event or reason names the other's jobs.
    assert "Preempted for a job of another team" in event.message
    assert f"job {newcomer.pk}" not in event.message
    entry = QueueEntry.objects.get(job_id=newcomer.pk)
    assert entry.code == "preempting"
    assert "stopping 1 running job" in entry.reason
    assert f"({served.pk})" not in entry.reason
    assert f"job {served.pk}" not in entry.reason
    # Nothing more is preempted while it stops.
    assert run_pass().preempted == []

    # The worker's next poll is told to stop, and why.
    poll = {"job": served.pk, "attempt": 1, "rank": 0, "run": f"run-{served.pk}-0"}
    [answer] = reports.attempt_status(node_a, [poll])
    assert answer["action"] == "stop"
    assert "preempted" in answer["reason"]
    answer = reports.result(node_a, served.pk, 1, rank=0, run_id=f"run-{served.pk}-0", status="cancelled",
                            error="Stopped: preempted.")
    served.refresh_from_db()
    assert (served.state, served.attempt, served.preemptions) == (JobState.QUEUED, 2, 1)
    assert served.ran_seconds == pytest.approx(7200, abs=60)
    assert Allocation.objects.filter(job=served, released_at__isnull=True).count() == 0
    assert "requeued as attempt 2" in served.events.filter(to_state=JobState.QUEUED).last().message

    # The next pass places the newcomer; the served job waits behind it and says why.
    assert run_pass().placed == [newcomer.pk]
    reason = Job.objects.select_related("queue_entry").get(pk=served.pk).waiting_reason
    assert "past the preemption mark" in reason
    assert "16.0 GPU-hours" in reason


def test_a_preemption_uses_up_no_attempt(served, charlie, team_b, node_a):
    Job.objects.filter(pk=served.pk).update(max_attempts=2)
    training(charlie, team_b, gpus=4, name="short")
    run_pass()
    reports.result(node_a, served.pk, 1, rank=0, run_id=f"run-{served.pk}-0", status="cancelled")
    served.refresh_from_db()
    assert (served.state, served.attempt) == (JobState.QUEUED, 2)
    # Attempt 2 runs and is lost with its node: it is the first attempt lost, so with 2 allowed it runs again.
    Job.objects.filter(pk=served.pk).update(state=JobState.RUNNING)
    AttemptRun.objects.create(job=served, attempt=2, node=node_a, run_id="run-2", started_at=timezone.now(),
                              seen_at=timezone.now())
    reports.retry_or_fail(served.pk, 2, "Node a-node-1 is down")
    served.refresh_from_db()
    assert (served.state, served.attempt) == (JobState.QUEUED, 3)
    assert "attempt 3 (try 2 of 2; preemptions do not count)" in served.events.filter(
        to_state=JobState.QUEUED).last().message


def test_a_job_that_finishes_before_it_stops_succeeds(served, charlie, team_b, node_a):
    training(charlie, team_b, gpus=4, name="short")
    run_pass()
    reports.result(node_a, served.pk, 1, rank=0, run_id=f"run-{served.pk}-0", status="succeeded",
                   result={"final_accuracy": 0.9})
    served.refresh_from_db()
    assert served.state == JobState.SUCCEEDED
    assert served.preemptions == 0


def test_a_preemption_no_worker_confirms_is_finished_by_the_reconciler(served, charlie, team_b, settings):
    training(charlie, team_b, gpus=4, name="short")
    run_pass()
    later = timezone.now() + timedelta(seconds=settings.DEEPOPT_WORKERS["cancel_timeout_s"] + 5)
    # The node and its worker are alive (they heartbeat and poll); only the stop is never confirmed.
    GpuNode.objects.update(last_heartbeat_at=later)
    AttemptRun.objects.filter(job=served).update(seen_at=later)
    done = reconcile(now=later)
    assert done["preempted"] == [served.pk]
    served.refresh_from_db()
    assert (served.state, served.attempt, served.preemptions) == (JobState.QUEUED, 2, 1)
    assert Allocation.objects.filter(job=served, released_at__isnull=True).count() == 0


def test_a_rank_that_finishes_while_its_job_is_preempted_is_noted_not_requeued(served, charlie, team_b, node_a):
    training(charlie, team_b, gpus=4, name="short")
    run_pass()
    Job.objects.filter(pk=served.pk).update(nodes=2)  # as if a second rank ran elsewhere
    AttemptRun.objects.create(job=served, attempt=1, rank=1, node=node_a, world_size=2, run_id="run-r1")
    AttemptRun.objects.filter(job=served, rank=0).update(world_size=2)
    reports.result(node_a, served.pk, 1, rank=1, run_id="run-r1", status="succeeded")
    served.refresh_from_db()
    assert served.state == JobState.PREEMPTING  # rank 0 decides
    reports.result(node_a, served.pk, 1, rank=0, run_id=f"run-{served.pk}-0", status="cancelled")
    served.refresh_from_db()
    assert (served.state, served.attempt) == (JobState.QUEUED, 2)


def test_a_job_being_preempted_can_still_be_cancelled(served, charlie, team_b, alice, node_a):
    training(charlie, team_b, gpus=4, name="short")
    run_pass()
    served.refresh_from_db()
    cancel_job(served, actor=alice)
    served.refresh_from_db()
    assert served.state == JobState.CANCELLING
    reports.result(node_a, served.pk, 1, rank=0, run_id=f"run-{served.pk}-0", status="cancelled")
    served.refresh_from_db()
    assert served.state == JobState.CANCELLED


def test_preemption_switched_off_in_settings_leaves_running_jobs_alone(served, charlie, team_b, settings):
    settings.DEEPOPT_SCHEDULER = {**settings.DEEPOPT_SCHEDULER, "preemption": False}
    waiting = training(charlie, team_b, gpus=4, name="short")
    assert run_pass().preempted == []
    served.refresh_from_db()
    assert served.state == JobState.RUNNING
    assert QueueEntry.objects.get(job_id=waiting.pk).code != "preempting"
    assert not JobEvent.objects.filter(job=served, to_state=JobState.PREEMPTING).exists()
