"""The job state machine: what may follow what, what each step writes, and what the database forbids."""
from __future__ import annotations

import itertools

import pytest
from django.db import IntegrityError, transaction
from django.utils import timezone

from apps.scheduling.models import Allocation, Job, JobEvent
from apps.scheduling.services import cancel_job, transition
from apps.scheduling.states import TRANSITIONS, IllegalTransition, JobState

pytestmark = pytest.mark.django_db

S = JobState
# Written out here, not read from states.py: the test is the specification the table must match.
ALLOWED = {
    (S.QUEUED, S.ALLOCATED), (S.QUEUED, S.CANCELLED), (S.QUEUED, S.FAILED),
    (S.ALLOCATED, S.RUNNING), (S.ALLOCATED, S.QUEUED), (S.ALLOCATED, S.CANCELLING), (S.ALLOCATED, S.FAILED),
    (S.RUNNING, S.SUCCEEDED), (S.RUNNING, S.FAILED), (S.RUNNING, S.QUEUED), (S.RUNNING, S.CANCELLING),
    (S.CANCELLING, S.CANCELLED), (S.CANCELLING, S.FAILED),
    (S.ALLOCATED, S.PREEMPTING), (S.RUNNING, S.PREEMPTING),
    (S.PREEMPTING, S.QUEUED), (S.PREEMPTING, S.SUCCEEDED), (S.PREEMPTING, S.FAILED), (S.PREEMPTING, S.CANCELLING),
}
DISALLOWED = sorted(set(itertools.product(S.values, S.values)) - ALLOWED)


def make_job(team, user, state: str, attempt: int = 1) -> Job:  # noqa: ANN001
    """A job put straight into `state`, as if the machine had brought it there."""
    return Job.objects.create(team=team, submitter=user, name=f"job in {state}", kind="compression",
                              spec={"model": "minilm-l6"}, state=state, attempt=attempt)


def row(job: Job) -> tuple:
    return Job.objects.filter(pk=job.pk).values_list(
        "state", "attempt", "started_at", "finished_at", "pending_reason", "updated_at").get()


def test_the_transition_table_is_exactly_the_specified_one():
    table = {(src, dst) for src, nexts in TRANSITIONS.items() for dst in nexts}
    assert table == ALLOWED


@pytest.mark.parametrize(("source", "target"), sorted(ALLOWED), ids=lambda s: str(s))
def test_each_allowed_transition_moves_the_job_and_appends_exactly_one_event(alice, team_a, source, target):
    job = make_job(team_a, alice, source)
    events_before = JobEvent.objects.count()

    moved = transition(job, target, message="step", actor=alice)

    assert moved.state == target
    assert Job.objects.get(pk=job.pk).state == target
    assert JobEvent.objects.count() == events_before + 1
    event = JobEvent.objects.get(job=job)
    assert (event.from_state, event.to_state, event.message, event.actor_id) == (source, target, "step", alice.pk)
    assert event.attempt == moved.attempt


@pytest.mark.parametrize(("source", "target"), DISALLOWED, ids=lambda s: str(s))
def test_each_disallowed_transition_raises_and_writes_nothing(alice, team_a, source, target):
    job = make_job(team_a, alice, source)
    before = row(job)

    with pytest.raises(IllegalTransition) as raised:
        transition(job, target, message="should not happen", actor=alice)

    assert (raised.value.current, raised.value.target) == (source, target)
    assert row(job) == before
    assert not JobEvent.objects.filter(job=job).exists()


def test_terminal_states_go_nowhere():
    assert all(not TRANSITIONS[s] for s in (S.SUCCEEDED, S.FAILED, S.CANCELLED))


@pytest.fixture
def running_job_on_two_gpus(alice, team_a, node_a) -> Job:  # noqa: ANN001
    job = make_job(team_a, alice, S.RUNNING)
    job.started_at = timezone.now()
    job.save()
    for gpu in node_a.gpus.order_by("index")[:2]:
        Allocation.objects.create(job=job, attempt=1, gpu=gpu, node=node_a)
    return job


def test_a_retry_goes_back_to_queued_as_the_next_attempt_and_releases_its_gpus(running_job_on_two_gpus):
    job = running_job_on_two_gpus

    requeued = transition(job, S.QUEUED, message="node lost")

    assert requeued.attempt == 2
    assert requeued.started_at is None
    assert not Allocation.objects.filter(job=job, released_at__isnull=True).exists()
    assert Allocation.objects.filter(job=job, released_at__isnull=False).count() == 2
    event = JobEvent.objects.get(job=job)
    assert (event.from_state, event.to_state, event.attempt) == (S.RUNNING, S.QUEUED, 2)


@pytest.mark.parametrize("target", [S.SUCCEEDED, S.FAILED])
def test_an_ending_job_gives_its_gpus_back(running_job_on_two_gpus, target):
    ended = transition(running_job_on_two_gpus, target)
    assert ended.finished_at is not None
    assert not Allocation.objects.filter(job=ended, released_at__isnull=True).exists()


def test_a_cancelling_job_keeps_its_gpus_until_its_worker_stops(running_job_on_two_gpus, alice):
    job = cancel_job(running_job_on_two_gpus, actor=alice)
    assert job.state == S.CANCELLING
    assert Allocation.objects.filter(job=job, released_at__isnull=True).count() == 2
    transition(job, S.CANCELLED)
    assert not Allocation.objects.filter(job=job, released_at__isnull=True).exists()


def test_two_live_allocations_of_one_gpu_are_refused_by_the_database(alice, team_a, node_a):
    gpu = node_a.gpus.get(index=0)
    first, second = make_job(team_a, alice, S.ALLOCATED), make_job(team_a, alice, S.ALLOCATED)
    Allocation.objects.create(job=first, attempt=1, gpu=gpu, node=node_a)

    with pytest.raises(IntegrityError), transaction.atomic():
        Allocation.objects.create(job=second, attempt=1, gpu=gpu, node=node_a)

    assert Allocation.objects.filter(gpu=gpu).count() == 1


def test_a_released_allocation_does_not_block_a_new_live_one(alice, team_a, node_a):
    gpu = node_a.gpus.get(index=0)
    old, new = make_job(team_a, alice, S.SUCCEEDED), make_job(team_a, alice, S.ALLOCATED)
    Allocation.objects.create(job=old, attempt=1, gpu=gpu, node=node_a, released_at=timezone.now())
    Allocation.objects.create(job=old, attempt=2, gpu=gpu, node=node_a, released_at=timezone.now())

    Allocation.objects.create(job=new, attempt=1, gpu=gpu, node=node_a)

    assert Allocation.objects.filter(gpu=gpu, released_at__isnull=True).get().job_id == new.pk


@pytest.fixture
def event(alice, team_a) -> JobEvent:  # noqa: ANN001
    job = make_job(team_a, alice, S.QUEUED)
    return JobEvent.objects.create(job=job, to_state=S.QUEUED, message="Submitted.")


def test_a_job_event_cannot_be_saved_again(event):
    event.message = "rewritten"
    with pytest.raises(TypeError, match="append-only"):
        event.save()
    assert JobEvent.objects.get(pk=event.pk).message == "Submitted."


def test_a_job_event_cannot_be_deleted(event):
    with pytest.raises(TypeError, match="append-only"):
        event.delete()
    assert JobEvent.objects.filter(pk=event.pk).exists()


@pytest.mark.parametrize("bulk", ["update", "delete"])
def test_job_events_cannot_be_changed_in_bulk(event, bulk):
    qs = JobEvent.objects.filter(pk=event.pk)
    with pytest.raises(TypeError, match="append-only"):
        qs.update(message="rewritten") if bulk == "update" else qs.delete()
    assert JobEvent.objects.get(pk=event.pk).message == "Submitted."


def test_a_report_from_a_stale_attempt_changes_nothing(alice, team_a):
    job = make_job(team_a, alice, S.RUNNING, attempt=2)
    before = row(job)

    with pytest.raises(IllegalTransition):
        transition(job, S.SUCCEEDED, expected_attempt=1)

    assert row(job) == before
    assert not JobEvent.objects.filter(job=job).exists()


def test_a_report_from_the_current_attempt_is_applied(alice, team_a):
    job = make_job(team_a, alice, S.RUNNING, attempt=2)
    assert transition(job, S.SUCCEEDED, expected_attempt=2).state == S.SUCCEEDED
