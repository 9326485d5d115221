"""No N+1 queries: each list endpoint costs the same number of queries for 5 rows as for 60.

The absolute bounds are what a list needs and no more: authentication (token → user), the caller's
teams, the page count, the page itself, and one prefetch per nested collection.
"""
from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from apps.accounts.models import Team
from apps.accounts.services import create_user, set_membership
from apps.cluster.models import Gpu, GpuNode
from apps.scheduling.models import Allocation, Job, JobEvent, QueueEntry

pytestmark = pytest.mark.django_db

SPEC = {"model": "minilm-l6", "quantization": {"mode": "auto", "max_quality_drop": 0.01},
        "pruning": {"keep_ratio": 0.7}}


def client_of(user) -> APIClient:  # noqa: ANN001
    client = APIClient()
    token, _ = Token.objects.get_or_create(user=user)
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client


def queries_for(client: APIClient, path: str, rows: int) -> int:
    with CaptureQueriesContext(connection) as captured:
        response = client.get(path)
    assert response.status_code == 200, response.content
    body = response.json()
    listed = len(body["results"]) if isinstance(body, dict) and "results" in body else len(body)
    assert listed == rows, f"{path} listed {listed}, expected {rows}"
    return len(captured.captured_queries)


def add_jobs(team: Team, users: list, n: int) -> list[Job]:
    """Jobs from several submitters, so a per-row submitter lookup would show."""
    return Job.objects.bulk_create(
        Job(team=team, submitter=users[i % len(users)], name=f"job {i}", kind="compression", spec=SPEC,
            state=["queued", "running", "succeeded"][i % 3])
        for i in range(n)
    )


def add_nodes(team: Team, n: int, gpus_each: int = 4) -> list[GpuNode]:
    start = GpuNode.objects.count()
    nodes = GpuNode.objects.bulk_create(
        GpuNode(team=team, name=f"n-{start + i}", hostname=f"n{start + i}.example", token_hash=f"{start + i:064x}")
        for i in range(n)
    )
    Gpu.objects.bulk_create(
        Gpu(node=node, index=i, model="NVIDIA H200", memory_mb=143_771) for node in nodes for i in range(gpus_each)
    )
    return nodes


def hold_some_gpus(team: Team, user, nodes: list[GpuNode]) -> None:  # noqa: ANN001
    """A live allocation on every other node's first GPU, so the busy flag has work to do."""
    job = Job.objects.create(team=team, submitter=user, name="holder", kind="compression", spec=SPEC,
                             state="running")
    for node in nodes[::2]:
        Allocation.objects.create(job=job, attempt=1, node=node, gpu=node.gpus.get(index=0))


@pytest.fixture
def submitters(team_a, alice, bob) -> list:  # noqa: ANN001
    carol = create_user(username="carol", password="carol-pass-123")
    set_membership(team=team_a, user=carol)
    return [alice, bob, carol]


@pytest.mark.parametrize("persona", ["alice", "dana"])
def test_the_job_list_costs_the_same_queries_for_5_jobs_as_for_a_page_of_50(
    request, team_a, submitters, dana, persona,
):
    client = client_of(request.getfixturevalue(persona))
    add_jobs(team_a, submitters, 5)
    few = queries_for(client, "/api/v1/jobs/", 5)
    add_jobs(team_a, submitters, 60)
    many = queries_for(client, "/api/v1/jobs/", 50)
    assert few == many
    # token → user, the caller's teams (not for staff), count, page with team and submitter joined
    assert many <= 4


def test_the_filtered_job_list_costs_the_same_queries_too(team_a, submitters):
    client = client_of(submitters[0])
    add_jobs(team_a, submitters, 6)
    few = queries_for(client, f"/api/v1/jobs/?state=queued&kind=compression&team={team_a.pk}", 2)
    add_jobs(team_a, submitters, 60)
    many = queries_for(client, f"/api/v1/jobs/?state=queued&kind=compression&team={team_a.pk}", 22)
    assert few == many


@pytest.mark.parametrize("persona", ["alice", "dana"])
def test_the_node_list_with_gpus_and_busy_flags_costs_constant_queries(request, team_a, alice, dana, persona):
    client = client_of(request.getfixturevalue(persona))
    hold_some_gpus(team_a, alice, add_nodes(team_a, 5))
    few = queries_for(client, "/api/v1/nodes/", 5)
    hold_some_gpus(team_a, alice, add_nodes(team_a, 55))
    many = queries_for(client, "/api/v1/nodes/", 50)
    assert few == many
    # token → user, the caller's teams, count, nodes with team joined, all their GPUs with busy flags
    assert many <= 5
    busy = [gpu["busy"] for node in client.get("/api/v1/nodes/?page_size=200").json()["results"]
            for gpu in node["gpus"]]
    assert sum(busy) == Allocation.objects.filter(released_at__isnull=True).count()


def test_the_team_list_costs_constant_queries(dana):
    client = client_of(dana)
    Team.objects.bulk_create(Team(name=f"team {i}", slug=f"team-{i}") for i in range(5))
    few = queries_for(client, "/api/v1/teams/", 5)
    Team.objects.bulk_create(Team(name=f"team {i}", slug=f"team-{i}") for i in range(5, 60))
    many = queries_for(client, "/api/v1/teams/", 50)
    assert few == many
    assert many <= 3  # token → user, count, page


def test_a_members_team_list_costs_constant_queries(alice):
    client = client_of(alice)
    teams = Team.objects.bulk_create(Team(name=f"team {i}", slug=f"team-{i}") for i in range(60))
    for team in teams[:4]:
        set_membership(team=team, user=alice)
    few = queries_for(client, "/api/v1/teams/", 5)  # team A and four more
    for team in teams[4:]:
        set_membership(team=team, user=alice)
    many = queries_for(client, "/api/v1/teams/", 50)
    assert few == many
    assert many <= 3


def test_the_members_list_costs_constant_queries(team_a, alice):
    client = client_of(alice)
    for i in range(4):
        set_membership(team=team_a, user=create_user(username=f"m{i}", password="pass-12345"))
    few = queries_for(client, f"/api/v1/teams/{team_a.pk}/members/", 5)
    for i in range(4, 60):
        set_membership(team=team_a, user=create_user(username=f"m{i}", password="pass-12345"))
    many = queries_for(client, f"/api/v1/teams/{team_a.pk}/members/", 50)
    assert few == many
    assert many <= 4  # token → user, the team, count, memberships with users joined


def test_the_events_list_costs_constant_queries(team_a, alice, submitters):
    client = client_of(alice)
    job = Job.objects.create(team=team_a, submitter=alice, name="chatty", kind="compression", spec=SPEC)

    def add_events(n: int) -> None:
        # Actors vary so that a per-row actor lookup would show.
        JobEvent.objects.bulk_create(
            JobEvent(job=job, kind="progress", message=f"step {i}", data={"step": i},
                     actor=submitters[i % len(submitters)] if i % 4 else None)
            for i in range(n)
        )

    add_events(5)
    few = queries_for(client, f"/api/v1/jobs/{job.pk}/events/", 5)
    add_events(60)
    many = queries_for(client, f"/api/v1/jobs/{job.pk}/events/", 50)
    assert few == many
    # token → user, the caller's teams, the job, count, events with actors joined
    assert many <= 5


@pytest.mark.parametrize("persona", ["alice", "dana"])
def test_the_queue_costs_constant_queries(request, team_a, submitters, dana, persona):
    client = client_of(request.getfixturevalue(persona))

    def enqueue(n: int) -> None:
        start = QueueEntry.objects.count()
        jobs = add_jobs(team_a, submitters, n)
        Job.objects.filter(pk__in=[j.pk for j in jobs]).update(state="queued")
        QueueEntry.objects.bulk_create(
            QueueEntry(job=job, position=start + i, flow=team_a.slug, start_tag=0.0, finish_tag=float(i),
                       reason="Waiting.", code="waiting", updated_at=timezone.now())
            for i, job in enumerate(jobs, start=1)
        )

    enqueue(5)
    few = queries_for(client, "/api/v1/queue/", 5)
    enqueue(60)
    many = queries_for(client, "/api/v1/queue/", 50)
    assert few == many
    assert many <= 4  # token → user, the caller's teams, count, entries with job and team joined


def test_the_user_list_costs_constant_queries(dana):
    client = client_of(dana)
    for i in range(4):
        create_user(username=f"u{i}", password="pass-12345")
    few = queries_for(client, "/api/v1/users/", 5)
    for i in range(4, 60):
        create_user(username=f"u{i}", password="pass-12345")
    many = queries_for(client, "/api/v1/users/", 50)
    assert few == many
    assert many <= 3


def test_me_costs_constant_queries_whatever_the_number_of_teams(alice):
    client = client_of(alice)
    few = queries_for_me(client)
    for i in range(30):
        set_membership(team=Team.objects.create(name=f"extra {i}"), user=alice)
    assert queries_for_me(client) == few


def queries_for_me(client: APIClient) -> int:
    with CaptureQueriesContext(connection) as captured:
        response = client.get("/api/v1/me/")
    assert response.status_code == 200
    return len(captured.captured_queries)

