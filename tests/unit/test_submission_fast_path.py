"""The submission and list paths are tuned for throughput (bench/api.py, bench/README.md): a hand-built
job representation, queries and INSERTs compiled once, a briefly cached cluster capacity. Each must
give exactly what the plain Django/DRF way gives."""
from __future__ import annotations

import datetime as dt
import json

import pytest
from django.core.serializers.json import DjangoJSONEncoder
from django.db import connection
from django.db.models.signals import post_save, pre_save
from django.test.utils import CaptureQueriesContext
from rest_framework import serializers
from rest_framework.authtoken.models import Token

from apps.accounts.authentication import _TOKEN_WITH_USER
from apps.accounts.compiled import CompiledInsert, CompiledQuery
from apps.accounts.models import Team
from apps.accounts.permissions import team_ids_of
from apps.cluster.services import register_node
from apps.scheduling.api.serializers import JobSerializer
from apps.scheduling.models import Job, JobEvent
from apps.scheduling.services import submit_job
from tests.conftest import COMPRESSION_JOB

pytestmark = pytest.mark.django_db


def fields_of(obj) -> dict:  # noqa: ANN001
    return {k: v for k, v in vars(obj).items() if not k.startswith("_")}


def generic(job: Job) -> dict:
    return serializers.ModelSerializer.to_representation(JobSerializer(), job)


def test_a_just_submitted_job_reads_the_same_as_drfs_field_by_field_output(alice, team_a):
    job = submit_job(submitter=alice, team=team_a, name="fresh", kind=Job.Kind.COMPRESSION,
                     spec={"model": "minilm-l6", "pruning": {"keep_ratio": 0.5}})
    assert JobSerializer(job).data == generic(job)
    assert list(JobSerializer(job).data) == JobSerializer.Meta.fields


def test_a_finished_job_with_every_field_set_reads_the_same(alice, team_a):
    start = dt.datetime(2026, 3, 1, 12, 30, 15, 123456, tzinfo=dt.UTC)
    job = Job.objects.create(
        team=team_a, submitter=alice, name="done", kind=Job.Kind.TRAINING, priority=Job.Priority.URGENT,
        gpus=4, nodes=2, gpu_memory_gb=40.5, walltime_minutes=90, spec={"model": "resnet50", "steps": 10},
        state=Job.State.FAILED, pending_reason="", attempt=2, result={"loss": 0.25, "curve": [1, 2]},
        error="Traceback: out of memory", started_at=start, finished_at=start + dt.timedelta(minutes=5),
    )
    job = Job.objects.select_related("team", "submitter").get(pk=job.pk)
    mine = JobSerializer(job).data
    assert mine == generic(job)
    assert mine["started_at"] == "2026-03-01T12:30:15.123456Z"


def test_a_page_of_jobs_reads_the_same(alice, bob, team_a):
    for i in range(3):
        submit_job(submitter=[alice, bob][i % 2], team=team_a, name=f"job {i}", kind=Job.Kind.COMPRESSION,
                   spec={"model": "minilm-l6"})
    jobs = list(Job.objects.select_related("team", "submitter"))
    assert JobSerializer(jobs, many=True).data == [generic(job) for job in jobs]


def test_the_list_endpoints_rows_read_the_same_as_drfs_field_by_field_output(alice, bob, team_a, client_for):
    start = dt.datetime(2026, 3, 1, 12, 30, 15, 123456, tzinfo=dt.UTC)
    Job.objects.create(
        team=team_a, submitter=bob, name="done", kind=Job.Kind.TRAINING, priority=Job.Priority.URGENT,
        gpus=4, nodes=2, gpu_memory_gb=40.5, walltime_minutes=90, spec={"model": "resnet50", "steps": 10},
        state=Job.State.FAILED, attempt=2, result={"loss": 0.25, "curve": [1, 2]}, error="oom",
        started_at=start, finished_at=start + dt.timedelta(minutes=5))
    submit_job(submitter=alice, team=team_a, name="fresh", kind=Job.Kind.COMPRESSION, spec={"model": "minilm-l6"})
    rows = client_for(alice).get("/api/v1/jobs/").json()["results"]
    jobs = {job.pk: job for job in Job.objects.select_related("team", "submitter")}
    assert len(rows) == 2
    for row in rows:
        expected = generic(jobs[row["id"]])
        # The API renders with orjson; compare through JSON on both sides.
        assert row == json.loads(json.dumps(expected, cls=DjangoJSONEncoder))
        assert list(row) == JobSerializer.Meta.fields


def test_the_compiled_token_lookup_gives_the_orms_token_and_user_in_one_query(alice):
    key = Token.objects.create(user=alice).key
    with CaptureQueriesContext(connection) as queries:
        [token] = _TOKEN_WITH_USER.objects(key)
        user = token.user  # already attached: no second query
    assert len(queries) == 1
    orm = Token.objects.select_related("user").get(key=key)
    assert fields_of(token) == fields_of(orm)
    assert fields_of(user) == fields_of(orm.user)
    assert _TOKEN_WITH_USER.objects("no-such-token") == []


def test_a_compiled_query_takes_new_values_and_sends_other_types_through_the_orm(team_a, team_b):
    by_name = CompiledQuery(lambda name, pk: Team.objects.filter(name=name, pk__gte=pk), "\0name", -(2**40))
    assert by_name.objects("Team A", 0) == [team_a]
    assert by_name.objects("Team B", 0) == [team_b]
    assert by_name.objects("Team B", team_b.pk + 1) == []
    assert by_name.objects("Team A", 0.5) == [team_a]  # a float: the ORM's own query


def test_a_compiled_values_query_gives_rows(alice, team_a, team_b):
    from apps.accounts.services import set_membership

    set_membership(team=team_b, user=alice)
    assert team_ids_of(alice) == {team_a.pk, team_b.pk}


def test_a_placeholder_that_the_sql_does_not_take_as_a_parameter_is_refused(team_a):
    sliced = CompiledQuery(lambda n: Team.objects.filter(pk__gte=n).order_by("pk")[:n], 987654)
    with pytest.raises(ValueError, match="written into the SQL"):
        sliced.objects(1)
    unused = CompiledQuery(lambda n: Team.objects.filter(pk__gte=1), 987654)
    with pytest.raises(ValueError, match="not a parameter"):
        unused.objects(1)


def test_the_compiled_insert_writes_what_create_writes_and_sends_the_signals(alice, team_a):
    seen = []

    def record(sender, instance, **kwargs) -> None:  # noqa: ANN001
        seen.append((kwargs.get("created"), instance.pk))

    pre_save.connect(record, sender=Job)
    post_save.connect(record, sender=Job)
    try:
        values = {"team": team_a, "submitter": alice, "name": "twin", "kind": "training", "gpus": 2,
                  "spec": {"model": "resnet50", "nested": {"a": [1, 2]}}, "walltime_minutes": None}
        fast = CompiledInsert(Job).create(**values)
    finally:
        pre_save.disconnect(record, sender=Job)
        post_save.disconnect(record, sender=Job)
    assert seen == [(None, None), (True, fast.pk)]
    slow = Job.objects.create(**values)
    assert fast.pk
    assert not fast._state.adding
    read = Job.objects.values()
    by_id = {row["id"]: row for row in read}
    ignore = {"id", "submitted_at", "updated_at"}
    assert {k: v for k, v in by_id[fast.pk].items() if k not in ignore} == \
        {k: v for k, v in by_id[slow.pk].items() if k not in ignore}
    assert fields_of(Job.objects.get(pk=fast.pk))["submitted_at"] == fast.submitted_at


def test_a_submission_costs_a_fixed_handful_of_queries(alice, team_a, node_a, client_for):
    client = client_for(alice)
    client.post("/api/v1/jobs/", {**COMPRESSION_JOB, "team": team_a.pk}, format="json")
    with CaptureQueriesContext(connection) as queries:
        response = client.post("/api/v1/jobs/", {**COMPRESSION_JOB, "team": team_a.pk}, format="json")
    assert response.status_code == 201
    # token → user, the team (with the membership), the capacity (cached outside tests), the job, its event;
    # SQLite's BEGIN is not a query of its own.
    assert len(queries) <= 7, [q["sql"] for q in queries.captured_queries]
    assert JobEvent.objects.filter(job_id=response.json()["id"]).count() == 1


def test_a_node_registered_here_counts_at_once_for_the_cached_capacity(alice, team_a, node_a, client_for, settings):
    settings.DEEPOPT_CAPACITY_CACHE_SECONDS = 3600
    team_a.max_gpus = team_a.max_gpus_per_job = 16
    team_a.save()
    client = client_for(alice)
    big = {**COMPRESSION_JOB, "team": team_a.pk, "resources": {"gpus": 16, "nodes": 1}}
    refused = client.post("/api/v1/jobs/", big, format="json")
    assert refused.status_code == 400
    assert "can ever hold" in refused.json()["resources"][0]
    register_node(team=team_a, name="a-node-big", hostname="abig.example", rack="r1",
                  gpus=[{"index": i, "model": "NVIDIA H200", "memory_mb": 143_771} for i in range(16)])
    assert client.post("/api/v1/jobs/", big, format="json").status_code == 201


def test_the_listed_jobs_read_as_drfs_field_by_field_output_of_each_job(alice, bob, team_a, client_for):
    for i in range(3):
        submit_job(submitter=[alice, bob][i % 2], team=team_a, name=f"job {i}", kind=Job.Kind.COMPRESSION,
                   spec={"model": "minilm-l6"})
    listed = client_for(alice).get("/api/v1/jobs/").json()["results"]
    jobs = {job.pk: job for job in Job.objects.select_related("team", "submitter")}
    assert len(listed) == 3
    assert listed == [generic(jobs[row["id"]]) for row in listed]
