"""Personas used across the suite: Alice leads team A, Bob is on team A, Charlie is on team B,
Dana is staff. Bob can see Alice's jobs; Charlie cannot."""
from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from apps.accounts.models import Membership, Team
from apps.accounts.services import create_user, set_membership
from apps.cluster.services import register_node

# Helper modules with asserts that tests call into: let pytest explain their failures too.
pytest.register_assert_rewrite("tests.unit.api_permission_suite")


@pytest.fixture
def team_a(db) -> Team:
    return Team.objects.create(name="Team A", weight=2.0, max_gpus=8, gpu_hours_per_month=1000, max_gpus_per_job=8)


@pytest.fixture
def team_b(db) -> Team:
    return Team.objects.create(name="Team B", weight=1.0, max_gpus=4, gpu_hours_per_month=500, max_gpus_per_job=4)


@pytest.fixture
def alice(team_a):
    user = create_user(username="alice", password="alice-pass-123", email="alice@example.com")
    set_membership(team=team_a, user=user, role=Membership.Role.LEAD)
    return user


@pytest.fixture
def bob(team_a):
    user = create_user(username="bob", password="bob-pass-123", email="bob@example.com")
    set_membership(team=team_a, user=user, role=Membership.Role.MEMBER)
    return user


@pytest.fixture
def charlie(team_b):
    user = create_user(username="charlie", password="charlie-pass-123", email="charlie@example.com")
    set_membership(team=team_b, user=user, role=Membership.Role.MEMBER)
    return user


@pytest.fixture
def dana(db):
    return create_user(username="dana", password="dana-pass-123", email="dana@example.com", is_staff=True)


@pytest.fixture
def client_for():
    """client_for(user) -> an APIClient authenticated with the user's token; client_for(None) -> anonymous."""

    def make(user) -> APIClient:
        from rest_framework.authtoken.models import Token

        client = APIClient()
        if user is not None:
            token, _ = Token.objects.get_or_create(user=user)
            client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
        return client

    return make


@pytest.fixture
def node_a(team_a):
    node, _token = register_node(
        team=team_a, name="a-node-1", hostname="a1.example", rack="r1",
        gpus=[{"index": i, "model": "NVIDIA H200", "memory_mb": 143_771} for i in range(8)],
    )
    return node


@pytest.fixture
def node_b(team_b):
    node, _token = register_node(
        team=team_b, name="b-node-1", hostname="b1.example", rack="r2",
        gpus=[{"index": i, "model": "NVIDIA H200", "memory_mb": 143_771} for i in range(4)],
    )
    return node


COMPRESSION_JOB = {
    "name": "quantize minilm",
    "kind": "compression",
    "priority": "normal",
    "resources": {"gpus": 1, "nodes": 1},
    "walltime_minutes": 30,
    "spec": {"model": "minilm-l6", "quantization": {"mode": "auto", "max_quality_drop": 0.01},
             "pruning": {"keep_ratio": 0.7}},
}


@pytest.fixture
def job_of_alice(alice, team_a, node_a, client_for):
    response = client_for(alice).post("/api/v1/jobs/", {**COMPRESSION_JOB, "team": team_a.pk}, format="json")
    assert response.status_code == 201, response.content
    from apps.scheduling.models import Job

    return Job.objects.get(pk=response.json()["id"])
