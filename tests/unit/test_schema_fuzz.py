"""Schemathesis against DeepOpt's own OpenAPI schema: no request, valid or not, gets a 5xx.

The schema is loaded from /api/schema/ through the WSGI app, so the fuzzer sees exactly what a client
sees. Every operation is called with a token of Dana (staff) and of Alice (a team lead, who meets the
permission branches), against a database holding a team, a member, a node and a job; path ids point at
those real objects half of the time (random ids would only ever reach the 404 branch).
"""
from __future__ import annotations

import pytest
import schemathesis
from django.core import signals
from django.core.handlers.wsgi import WSGIHandler
from django.db import close_old_connections
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from rest_framework.authtoken.models import Token
from schemathesis.checks import not_a_server_error

from apps.scheduling.services import submit_job

pytestmark = pytest.mark.django_db


@pytest.fixture
def _requests_keep_the_test_connection():
    """Django closes a connection it finds inside a transaction at the end of each request; the test's
    transaction is one, so on PostgreSQL the first request would close the test's own connection. Django's
    test client unhooks the same signal handler; the WSGI app schemathesis drives needs it done here."""
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    yield
    signals.request_started.connect(close_old_connections)
    signals.request_finished.connect(close_old_connections)


@pytest.fixture
def fuzz_world(request, _requests_keep_the_test_connection, dana, alice, bob, team_a, node_a) -> dict:  # noqa: ANN001
    job = submit_job(submitter=alice, team=team_a, name="fuzzed", kind="compression",
                     spec={"model": "minilm-l6"})
    caller = {"dana": dana, "alice": alice}[request.param]
    return {
        "token": Token.objects.get_or_create(user=caller)[0].key,
        "ids": {"teams": team_a.pk, "nodes": node_a.pk, "jobs": job.pk, "users": bob.pk},
        "username": bob.username,
    }


# Loaded at collection (pytest-django has set Django up by then); serving the schema reads no database.
# One test per operation. (schemathesis.pytest.from_fixture would defer the load, but its lazy runner
# sets Function._nodeid, which pytest 9 no longer has.)
schema = schemathesis.openapi.from_wsgi("/api/schema/?format=json", WSGIHandler())


def point_at_real_objects(case, world: dict) -> None:  # noqa: ANN001
    collection = case.path.split("/")[3]  # /api/v1/<collection>/...
    params = case.path_parameters or {}
    if "id" in params and collection in world["ids"]:
        params["id"] = world["ids"][collection]
    if "username" in params:
        params["username"] = world["username"]


@pytest.mark.parametrize("fuzz_world", ["dana", "alice"], indirect=True)
@schema.parametrize()
@schema.given(data=st.data())
@settings(max_examples=15, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_no_operation_answers_with_a_server_error(case, data, fuzz_world):
    if data.draw(st.booleans(), label="real objects"):
        point_at_real_objects(case, fuzz_world)
    case.call_and_validate(headers={"Authorization": f"Token {fuzz_world['token']}"}, checks=[not_a_server_error])


# The 500s the fuzzer found, kept as plain regression tests so they never depend on a random draw.


def test_an_error_inside_a_list_of_objects_is_a_400_not_a_500(dana, team_a, client_for):
    body = {"name": "n-1", "hostname": "h", "team": team_a.pk,
            "gpus": [{"index": 0, "model": "m", "memory_mb": 5}, {"index": 1, "model": "m", "memory_mb": 5, "x": 1}]}
    response = client_for(dana).post("/api/v1/nodes/", body, format="json")
    assert response.status_code == 400
    assert response.json() == {"gpus": {"1": {"x": ["Unknown field."]}}}


HUGE = str(10**23)


@pytest.mark.parametrize("path", ["/api/v1/jobs/", "/api/v1/nodes/"])
@pytest.mark.parametrize("team", ["-9.934023275647038e+291", "1.5", "0", HUGE])
def test_a_team_filter_that_is_not_an_id_is_a_400(alice, job_of_alice, client_for, path, team):
    response = client_for(alice).get(path, {"team": team})
    assert response.status_code == 400, response.content
    assert "team" in response.json()


@pytest.mark.parametrize("path", ["/api/v1/jobs/{}/", "/api/v1/jobs/{}/events/", "/api/v1/nodes/{}/",
                                  "/api/v1/teams/{}/", "/api/v1/teams/{}/members/", "/api/v1/users/{}/"])
def test_an_id_beyond_any_integer_column_is_a_404(dana, client_for, path):
    assert client_for(dana).get(path.format(HUGE)).status_code == 404


@pytest.mark.parametrize(
    ("value", "status"),
    [
        ("7842-08-18T00:34:25+17:53", 200),  # a legal ISO 8601 offset that PostgreSQL refuses as is
        ("2026-01-01T00:00:00-23:59", 200),
        ("9999-12-31T23:30:00-05:00", 400),  # past year 9999 once in UTC
        ("0001-01-01T00:10:00+05:00", 400),  # before year 1 once in UTC
    ],
)
def test_a_submitted_after_with_any_iso_offset_is_never_a_500(alice, job_of_alice, client_for, value, status):
    for bound in ("submitted_after", "submitted_before"):
        response = client_for(alice).get("/api/v1/jobs/", {bound: value})
        assert response.status_code == status, response.content
        if status == 400:
            assert bound in response.json()
