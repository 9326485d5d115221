"""Team isolation, proven against every endpoint: the permission suite's table, run row by row.

Bob is on Alice's team and can see her jobs but not manage her nodes; Charlie cannot see them at all;
Dana, staff, can do everything.
"""
from __future__ import annotations

import pytest
from django.http import HttpRequest
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from apps.scheduling.models import Job
from tests.conftest import COMPRESSION_JOB
from tests.unit.api_permission_suite import (
    ENDPOINTS,
    World,
    build_world,
    check_list_scoping,
    check_permission_case,
    list_cases,
    permission_cases,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def world(team_a, team_b, alice, bob, charlie, dana, node_a, node_b, settings, tmp_path) -> World:  # noqa: ANN001
    settings.MEDIA_ROOT = tmp_path / "media"  # the uploaded weights the world holds, and any the cases add
    return build_world(team_a=team_a, team_b=team_b, alice=alice, bob=bob, charlie=charlie, dana=dana,
                       node_a=node_a, node_b=node_b)


@pytest.mark.parametrize(("endpoint", "persona", "expected"), permission_cases())
def test_each_persona_gets_the_status_the_table_says(world, endpoint, persona, expected):
    check_permission_case(world, endpoint, persona, expected)


@pytest.mark.parametrize(("name", "persona"), list_cases())
def test_lists_show_exactly_the_teams_objects_the_persona_may_see(world, name, persona):
    check_list_scoping(world, name, persona)


def test_the_table_covers_every_api_route_and_method(world):
    """A new viewset or action without a row in the table would escape the isolation proof."""
    from django.urls import resolve

    from deepopt_web.api_router import router

    covered = set()
    for endpoint in ENDPOINTS:
        match = resolve(endpoint.url(world))
        covered.add((match.url_name, endpoint.method))
    expected = set()
    for _prefix, viewset, basename in router.registry:
        for route in router.get_routes(viewset):
            for http_method, action in route.mapping.items():
                if hasattr(viewset, action):
                    expected.add((route.name.format(basename=basename), http_method))
    expected |= {("api-me", "get")}
    assert expected <= covered, f"routes with no permission rows: {sorted(expected - covered)}"


def test_a_token_authenticated_write_needs_no_csrf_token(alice, team_a, node_a):
    client = APIClient(enforce_csrf_checks=True)
    token, _ = Token.objects.get_or_create(user=alice)
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    response = client.post("/api/v1/jobs/", {**COMPRESSION_JOB, "team": team_a.pk}, format="json")
    assert response.status_code == 201, response.content


def test_session_auth_works_for_the_api(alice):
    client = APIClient(enforce_csrf_checks=True)
    assert client.login(request=HttpRequest(), username="alice", password="alice-pass-123")  # axes needs a request
    response = client.get("/api/v1/me/")
    assert response.status_code == 200
    body = response.json()
    assert body["username"] == "alice"
    assert [(t["slug"], t["role"]) for t in body["teams"]] == [("team-a", "lead")]


def test_a_session_authenticated_write_without_csrf_token_is_refused(alice, team_a, node_a):
    """The flip side of the token test: a browser session cannot be ridden by another site."""
    client = APIClient(enforce_csrf_checks=True)
    assert client.login(request=HttpRequest(), username="alice", password="alice-pass-123")  # axes needs a request
    response = client.post("/api/v1/jobs/", {**COMPRESSION_JOB, "team": team_a.pk}, format="json")
    assert response.status_code == 403
    assert "CSRF" in response.json()["detail"]
    assert Job.objects.count() == 0
