"""Dispatch (one task per node, on its queue, with rank, world size and rendezvous) and the reconciler's
repairs: silent nodes, silent workers, attempts that never started, stuck cancels, leaked allocations.

Messages go through kombu's in-memory transport, read back from the node's queue as a worker would."""
from __future__ import annotations

from datetime import timedelta

import pytest
from django.conf import settings as django_settings
from django.utils import timezone
from kombu import Connection

from apps.cluster.models import GpuNode
from apps.cluster.services import register_node
from apps.scheduling.dispatch import RUN_ATTEMPT_TASK, on_job_changed, rendezvous_port
from apps.scheduling.models import Allocation, AttemptRun, Job, JobEvent
from apps.scheduling.reconciler import reconcile
from apps.scheduling.reports import retry_or_fail
from apps.scheduling.services import cancel_job, submit_job, transition
from apps.scheduling.states import JobState
from tests.unit.test_agent_api import allocate

pytestmark = pytest.mark.django_db


@pytest.fixture
def broker(settings):
    settings.DEEPOPT_DISPATCH = "celery"
    settings.DEEPOPT_DISPATCH_BROKER_URL = "memory://"
    with Connection("memory://") as connection:
        # The memory transport lives as long as the process: start each test with empty queues.
        for queue in ("node.gpu-one", "node.gpu-two"):
            take(connection, queue)
        yield connection


def take(connection: Connection, queue: str) -> list[dict]:
    """Every message waiting on a node's queue: (task name, payload)."""
    messages = []
    with connection.SimpleQueue(queue) as simple:
        while True:
            try:
                message = simple.get(block=False)
            except simple.Empty:
                return messages
            messages.append((message.headers["task"], message.payload[1]["payload"]))
            message.ack()


@pytest.fixture
def nodes(team_a, team_b):
    made = {}
    for name, team, rack in (("gpu-one", team_a, "r1"), ("gpu-two", team_b, "r2")):
        node, _ = register_node(team=team, name=name, hostname=f"{name}.example", rack=rack,
                                gpus=[{"index": i, "model": "NVIDIA H200", "memory_mb": 143_771} for i in range(4)])
        node.last_heartbeat_at = timezone.now()
        node.save()
        made[name] = node
    return made


def training_job(alice, team_a, gpus: int = 4, nodes: int = 2) -> Job:
    return submit_job(submitter=alice, team=team_a, name="hcof", kind="training", gpus=gpus, nodes=nodes,
                      spec={"model": "digits-mlp", "steps": 10, "batch_size": 32,
                            "hcof": {"intra_node": "none", "inter_node": "int4", "critical": "none"}})


def test_an_allocated_job_is_sent_to_each_of_its_nodes_with_rank_and_rendezvous(broker, nodes, alice, team_a,
                                                                               django_capture_on_commit_callbacks):
    job = training_job(alice, team_a)
    with django_capture_on_commit_callbacks(execute=True):
        allocate(job, (nodes["gpu-two"], [2, 3]), (nodes["gpu-one"], [0, 1]))
    [(task_two, rank0)] = take(broker, "node.gpu-two")
    [(task_one, rank1)] = take(broker, "node.gpu-one")
    assert task_one == task_two == RUN_ATTEMPT_TASK
    # The scheduler's order is the rank order; everyone meets at rank 0's node.
    assert (rank0["rank"], rank0["node"], rank0["gpu_indexes"]) == (0, "gpu-two", [2, 3])
    assert (rank1["rank"], rank1["node"], rank1["gpu_indexes"]) == (1, "gpu-one", [0, 1])
    for message in (rank0, rank1):
        assert message["world_size"] == 2
        assert message["master_addr"] == "gpu-two.example"
        assert message["master_port"] == rendezvous_port(job.pk, 1)
        assert (message["job"], message["attempt"], message["kind"]) == (job.pk, 1, "training")
        assert message["spec"]["hcof"]["inter_node"] == "int4"
        assert message["topology"] == {"nodes": [{"name": "gpu-two", "rack": "r2", "gpus": [0, 1]},
                                                 {"name": "gpu-one", "rack": "r1", "gpus": [0, 1]}]}
    runs = AttemptRun.objects.filter(job=job).order_by("rank")
    assert [(r.rank, r.node.name, r.dispatch_count) for r in runs] == [(0, "gpu-two", 1), (1, "gpu-one", 1)]


def test_a_retried_attempt_gets_another_rendezvous_port():
    ports = {rendezvous_port(7, attempt) for attempt in (1, 2, 3)}
    assert len(ports) == 3
    config = django_settings.DEEPOPT_WORKERS
    assert all(config["rendezvous_port_base"] <= p < config["rendezvous_port_base"] + config["rendezvous_port_span"]
               for p in ports)


def test_nothing_is_sent_while_dispatch_is_off(settings, nodes, alice, team_a):
    settings.DEEPOPT_DISPATCH = "off"
    job = training_job(alice, team_a, gpus=1, nodes=1)
    allocate(job, (nodes["gpu-one"], [0]))
    event = job.events.get(to_state=JobState.ALLOCATED)
    on_job_changed(Job, job=job, event=event)
    assert not AttemptRun.objects.exists()


# --- the reconciler --------------------------------------------------------------------------------

def later(seconds: float):  # noqa: ANN201
    return timezone.now() + timedelta(seconds=seconds)


def start(job: Job, node: GpuNode, rank: int = 0) -> AttemptRun:
    """What a worker's first report records: the run's claim, and the job running."""
    run, _ = AttemptRun.objects.update_or_create(job=job, attempt=job.attempt, rank=rank, defaults={
        "node": node, "run_id": f"run-{job.pk}-{rank}", "started_at": timezone.now(), "seen_at": timezone.now()})
    if job.state == JobState.ALLOCATED:
        transition(job, JobState.RUNNING, expected_attempt=job.attempt)
    return run


@pytest.fixture
def running_job(nodes, alice, team_a):
    job = training_job(alice, team_a, gpus=1, nodes=1)
    allocate(job, (nodes["gpu-one"], [0]))
    start(job, nodes["gpu-one"])
    job.refresh_from_db()
    return job


def test_a_silent_node_goes_down_and_its_attempt_is_retried(running_job, nodes):
    done = reconcile(now=later(django_settings.DEEPOPT_WORKERS["node_silent_s"] + 5))
    assert sorted(done["nodes_down"]) == ["gpu-one", "gpu-two"]
    running_job.refresh_from_db()
    assert (running_job.state, running_job.attempt) == (JobState.QUEUED, 2)
    event = running_job.events.get(to_state=JobState.QUEUED, from_state=JobState.RUNNING)
    assert "gpu-one stopped answering" in event.message
    assert "attempt 2 of 3" in event.message
    assert not Allocation.objects.filter(job=running_job, released_at__isnull=True).exists()
    assert GpuNode.objects.get(name="gpu-one").state == GpuNode.State.DOWN


def test_an_attempt_left_on_a_node_that_went_offline_is_retried(running_job, nodes):
    from apps.cluster.agent import go_offline

    go_offline(nodes["gpu-one"])  # its worker never handed the attempt back
    done = reconcile()
    assert done["nodes_down"] == []
    assert done["retried"] == [running_job.pk]
    running_job.refresh_from_db()
    assert (running_job.state, running_job.attempt) == (JobState.QUEUED, 2)
    assert "Node gpu-one is down" in running_job.events.last().message


def test_a_lost_worker_whose_node_also_missed_heartbeats_takes_the_node_down_first(running_job, nodes):
    missed = timedelta(seconds=django_settings.DEEPOPT_WORKERS["heartbeat_interval_s"] * 3 + 1)
    silent = django_settings.DEEPOPT_WORKERS["attempt_silent_s"]
    AttemptRun.objects.filter(job=running_job).update(seen_at=timezone.now() - timedelta(seconds=silent + 5))
    GpuNode.objects.filter(name="gpu-one").update(last_heartbeat_at=timezone.now() - missed)
    done = reconcile()
    assert done["nodes_down"] == ["gpu-one"]
    assert done["retried"] == [running_job.pk]
    assert GpuNode.objects.get(name="gpu-one").state == GpuNode.State.DOWN


def test_a_node_that_still_heartbeats_is_left_alone(running_job, nodes):
    assert reconcile()["nodes_down"] == []
    running_job.refresh_from_db()
    assert running_job.state == JobState.RUNNING


def test_the_last_attempt_lost_with_its_node_fails_the_job_with_the_reason(running_job):
    Job.objects.filter(pk=running_job.pk).update(max_attempts=1)
    reconcile(now=later(django_settings.DEEPOPT_WORKERS["node_silent_s"] + 5))
    running_job.refresh_from_db()
    assert running_job.state == JobState.FAILED
    assert "stopped answering" in running_job.error
    assert "No attempts left (1 tried)" in running_job.error


def test_an_attempt_whose_worker_stopped_reporting_is_retried(running_job, nodes):
    silent = django_settings.DEEPOPT_WORKERS["attempt_silent_s"]
    AttemptRun.objects.filter(job=running_job).update(seen_at=timezone.now() - timedelta(seconds=silent + 5))
    done = reconcile()
    assert done["retried"] == [running_job.pk]
    assert done["nodes_down"] == []  # its agent still heartbeats: the node stays, only the worker was lost
    running_job.refresh_from_db()
    assert (running_job.state, running_job.attempt) == (JobState.QUEUED, 2)
    assert AttemptRun.objects.get(job=running_job, attempt=1).status == "lost"


def test_an_allocation_not_started_in_time_is_sent_again_then_retried(broker, nodes, alice, team_a, settings):
    settings.DEEPOPT_WORKERS = {**settings.DEEPOPT_WORKERS, "start_timeout_s": 120.0, "max_redispatches": 1,
                                "node_silent_s": 10_000.0}
    job = training_job(alice, team_a, gpus=1, nodes=1)
    allocate(job, (nodes["gpu-one"], [1]))  # no commit callbacks in this test: the first dispatch was lost
    assert reconcile(now=later(60))["redispatched"] == []
    assert reconcile(now=later(130))["redispatched"] == [job.pk]
    [(_, message)] = take(broker, "node.gpu-one")
    assert (message["job"], message["attempt"], message["gpu_indexes"]) == (job.pk, 1, [1])
    assert job.events.filter(kind=JobEvent.Kind.NOTE, message__contains="sent to gpu-one again").exists()
    assert reconcile(now=later(200))["redispatched"] == []  # 120 s since the last send have not passed
    assert reconcile(now=later(260))["redispatched"] == [job.pk]
    done = reconcile(now=later(390))
    job.refresh_from_db()
    assert done["retried"] == [job.pk]
    assert (job.state, job.attempt) == (JobState.QUEUED, 2)
    assert "No worker on gpu-one started attempt 1 after 2 dispatches" in job.events.last().message


def test_a_started_attempt_is_never_sent_again(broker, running_job, settings):
    settings.DEEPOPT_WORKERS = {**settings.DEEPOPT_WORKERS, "node_silent_s": 10_000.0, "attempt_silent_s": 10_000.0}
    done = reconcile(now=later(1_000))
    assert done == {"nodes_down": [], "retried": [], "redispatched": [], "cancelled": [], "preempted": [],
                    "released": []}
    assert take(broker, "node.gpu-one") == []


def test_a_cancel_no_worker_confirms_ends_the_job(running_job, alice, settings):
    settings.DEEPOPT_WORKERS = {**settings.DEEPOPT_WORKERS, "node_silent_s": 10_000.0, "attempt_silent_s": 10_000.0}
    cancel_job(running_job, actor=alice)
    assert reconcile()["cancelled"] == []
    done = reconcile(now=later(django_settings.DEEPOPT_WORKERS["cancel_timeout_s"] + 5))
    running_job.refresh_from_db()
    assert done["cancelled"] == [running_job.pk]
    assert running_job.state == JobState.CANCELLED


def test_no_allocation_stays_live_for_a_job_that_ended(running_job):
    transition(running_job, JobState.SUCCEEDED, expected_attempt=1)
    leaked = Allocation.objects.filter(job=running_job).first()
    Allocation.objects.filter(pk=leaked.pk).update(released_at=None)  # a write that bypassed the state machine
    assert reconcile()["released"] == [running_job.pk]
    assert not Allocation.objects.filter(released_at__isnull=True).exists()


def test_beat_runs_the_reconciler_every_30_seconds():
    entry = django_settings.CELERY_BEAT_SCHEDULE["reconciler"]
    assert entry["task"] == "scheduling.reconcile"
    assert entry["schedule"] == 30.0


def test_attempts_that_never_started_use_up_no_attempt_but_only_up_to_a_limit(nodes, alice, team_a, settings):
    """A job allocated to nodes that never come up is not failed for it; past the limit such attempts
    count, so a job that nothing will ever start still ends."""
    settings.DEEPOPT_WORKERS = {**settings.DEEPOPT_WORKERS, "max_free_attempts": 3}
    job = training_job(alice, team_a, gpus=1, nodes=1)
    Job.objects.filter(pk=job.pk).update(max_attempts=2)
    for attempt in (1, 2, 3):
        job.refresh_from_db()
        allocate(job, (nodes["gpu-one"], [0]))  # dispatched, but no worker ever reports
        assert retry_or_fail(job.pk, attempt, "Node gpu-one is down").state == JobState.QUEUED
        message = job.events.filter(to_state=JobState.QUEUED).last().message
        assert f"attempt {attempt + 1} (try 1 of 2; attempts that never started or that a worker shutdown" \
               " stopped do not count)" in message
    # A fourth attempt that never starts is past the limit: all four count now, and 4 >= 2 attempts.
    job.refresh_from_db()
    allocate(job, (nodes["gpu-one"], [0]))
    failed = retry_or_fail(job.pk, 4, "Node gpu-one is down")
    assert failed.state == JobState.FAILED
    assert ("No attempts left: 4 attempts never started or were stopped by a worker shutdown (at most 3 are"
            " free), 4 in all.") in failed.error


def test_an_attempt_that_ran_counts_and_one_that_never_started_does_not(nodes, alice, team_a):
    job = training_job(alice, team_a, gpus=1, nodes=1)
    Job.objects.filter(pk=job.pk).update(max_attempts=2)
    job.refresh_from_db()
    allocate(job, (nodes["gpu-one"], [0]))
    start(job, nodes["gpu-one"])
    assert retry_or_fail(job.pk, 1, "Node gpu-one is down").state == JobState.QUEUED  # try 1 of 2 lost
    job.refresh_from_db()
    allocate(job, (nodes["gpu-one"], [0]))  # attempt 2 never starts: free
    assert retry_or_fail(job.pk, 2, "Node gpu-one is down").state == JobState.QUEUED
    job.refresh_from_db()
    allocate(job, (nodes["gpu-one"], [0]))
    start(job, nodes["gpu-one"])  # attempt 3 runs and is lost: the second try that counts, the last
    failed = retry_or_fail(job.pk, 3, "Node gpu-one is down")
    assert failed.state == JobState.FAILED
    assert "No attempts left (2 tried)" in failed.error


def test_an_attempt_stopped_by_a_worker_shutdown_is_free_and_one_lost_in_a_crash_is_not(nodes, alice, team_a):
    from apps.scheduling import reports

    job = training_job(alice, team_a, gpus=1, nodes=1)
    Job.objects.filter(pk=job.pk).update(max_attempts=1)
    job.refresh_from_db()
    allocate(job, (nodes["gpu-one"], [0]))
    run = start(job, nodes["gpu-one"])
    # The worker shuts down (a restart): it reports the run interrupted; the job is requeued, for free.
    reports.result(nodes["gpu-one"], job.pk, 1, rank=0, run_id=run.run_id, status="interrupted")
    job.refresh_from_db()
    assert (job.state, job.attempt) == (JobState.QUEUED, 2)
    assert "try 1 of 1" in job.events.filter(to_state=JobState.QUEUED).last().message
    # Attempt 2 runs and its node goes down under it: that one counts, and it was the only one allowed.
    allocate(job, (nodes["gpu-one"], [0]))
    start(job, nodes["gpu-one"])
    failed = retry_or_fail(job.pk, 2, "Node gpu-one is down")
    assert failed.state == JobState.FAILED
    assert "No attempts left (1 tried)" in failed.error
