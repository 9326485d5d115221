"""The API contract of issue 2, walked the way a new user walks it: from a staff token to a cancelled job.

Only Dana (staff) exists at the start, as after `createsuperuser`; everything else is made through the
API, so the test is a script a person could replay with curl.
"""
from __future__ import annotations

import json

import pytest
from rest_framework.test import APIClient

from apps.accounts.models import Membership, Team
from apps.cluster.models import GpuNode
from apps.scheduling.models import Job, JobEvent

pytestmark = pytest.mark.django_db

COMPRESSION = {
    "name": "quantize minilm",
    "kind": "compression",
    "priority": "normal",
    "resources": {"gpus": 1, "nodes": 1},
    "walltime_minutes": 30,
    "spec": {"model": "minilm-l6", "quantization": {"mode": "auto", "max_quality_drop": 0.01},
             "pruning": {"keep_ratio": 0.7}},
}


def token_for(username: str, password: str) -> str:
    response = APIClient().post("/api/v1/auth/token/", {"username": username, "password": password}, format="json")
    assert response.status_code == 200, response.content
    return response.json()["token"]


def client_with(token: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    return client


def created(response) -> dict:  # noqa: ANN001
    assert response.status_code == 201, response.content
    return response.json()


def counts() -> tuple[int, int]:
    return Job.objects.count(), JobEvent.objects.count()


def test_a_wrong_password_gets_no_token(dana):
    response = APIClient().post("/api/v1/auth/token/", {"username": "dana", "password": "nope"}, format="json")
    assert response.status_code == 400
    assert "token" not in response.json()
    assert response.json()["non_field_errors"]


def test_a_username_longer_than_any_user_can_have_is_a_400_not_a_server_error(dana):
    # Found by the schema fuzz on PostgreSQL: django-axes could not record the failure (varchar 255).
    response = APIClient().post("/api/v1/auth/token/", {"username": "d" * 300, "password": "nope"}, format="json")
    assert response.status_code == 400
    assert "150" in response.json()["username"][0]
    assert "token" not in response.json()


def test_the_same_user_gets_the_same_token_twice(dana):
    assert token_for("dana", "dana-pass-123") == token_for("dana", "dana-pass-123")


@pytest.fixture
def cluster(dana) -> dict:  # noqa: ANN001
    """Dana builds the organisation through the API; Alice registers a node of team A."""
    staff = client_with(token_for("dana", "dana-pass-123"))
    team_a = created(staff.post("/api/v1/teams/", {"name": "Vision", "weight": 2, "max_gpus": 16,
                                                   "gpu_hours_per_month": 1000, "max_gpus_per_job": 4}))
    team_b = created(staff.post("/api/v1/teams/", {"name": "Speech", "weight": 1, "max_gpus": 4,
                                                   "gpu_hours_per_month": 500, "max_gpus_per_job": 4}))
    for username in ("alice", "bob", "charlie"):
        user = created(staff.post("/api/v1/users/", {"username": username, "password": f"{username}-pass-123",
                                                     "email": f"{username}@example.com"}))
        assert "password" not in user
    for team, username, role in ((team_a, "alice", "lead"), (team_a, "bob", "member"),
                                 (team_b, "charlie", "member")):
        membership = created(staff.post(f"/api/v1/teams/{team['id']}/members/", {"username": username, "role": role}))
        assert (membership["username"], membership["role"], membership["team"]) == (username, role, team["id"])

    alice = client_with(token_for("alice", "alice-pass-123"))
    node = created(alice.post("/api/v1/nodes/", {
        "name": "vision-1", "hostname": "vision-1.example", "team": team_a["id"], "rack": "r1",
        "gpus": [{"index": i, "model": "NVIDIA H200", "memory_mb": 143_771} for i in range(8)],
    }))
    return {"staff": staff, "alice": alice, "team_a": team_a, "team_b": team_b, "node": node,
            "charlie": client_with(token_for("charlie", "charlie-pass-123"))}


def test_staff_builds_teams_users_and_memberships_through_the_api(cluster):
    assert set(Team.objects.values_list("slug", flat=True)) == {"vision", "speech"}
    assert set(Membership.objects.values_list("team__slug", "user__username", "role")) == {
        ("vision", "alice", "lead"), ("vision", "bob", "member"), ("speech", "charlie", "member")}
    me = cluster["alice"].get("/api/v1/me/").json()
    assert [(t["slug"], t["role"]) for t in me["teams"]] == [("vision", "lead")]


def test_a_node_token_is_shown_once_and_never_again(cluster):
    node = cluster["node"]
    token = node["token"]
    assert len(token) > 20
    assert [g["index"] for g in node["gpus"]] == list(range(8))
    assert node["state"] == "active"
    stored = GpuNode.objects.get(pk=node["id"])
    assert token not in stored.token_hash
    for client in (cluster["alice"], cluster["staff"]):
        for path in ("/api/v1/nodes/", f"/api/v1/nodes/{node['id']}/"):
            response = client.get(path)
            assert response.status_code == 200
            assert token not in response.content.decode()
            assert b'"token"' not in response.content


def test_alice_submits_a_job_sees_it_queued_and_charlie_cannot_find_it(cluster):
    alice, charlie = cluster["alice"], cluster["charlie"]
    job = created(alice.post("/api/v1/jobs/", {**COMPRESSION, "team": cluster["team_a"]["id"]}))
    assert job["state"] == "queued"
    assert job["team"] == cluster["team_a"]["id"]
    assert job["submitter"] == "alice"

    detail = alice.get(f"/api/v1/jobs/{job['id']}/")
    assert detail.status_code == 200
    assert detail.json()["state"] == "queued"
    assert [j["id"] for j in alice.get("/api/v1/jobs/").json()["results"]] == [job["id"]]

    assert charlie.get(f"/api/v1/jobs/{job['id']}/").status_code == 404
    assert charlie.get(f"/api/v1/jobs/{job['id']}/events/").status_code == 404
    assert charlie.get("/api/v1/jobs/").json() == {"count": 0, "next": None, "previous": None, "results": []}
    assert APIClient().get(f"/api/v1/jobs/{job['id']}/").status_code == 401
    assert APIClient().get("/api/v1/jobs/").status_code == 401


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        pytest.param({**COMPRESSION, "kind": "mining"}, "kind", "not a valid choice", id="unknown-kind"),
        pytest.param({**COMPRESSION, "resources": {"gpus": -1}}, "resources", "greater than or equal to 1",
                     id="negative-gpus"),
        pytest.param({**COMPRESSION, "spec": {"model": "gpt-17"}}, "spec", "not a valid choice",
                     id="unknown-model"),
        pytest.param({**COMPRESSION, "resources": {"gpus": 6}}, "resources", "limit of 4 GPUs per job",
                     id="over-max-gpus-per-job"),
        pytest.param({**COMPRESSION, "spec": {"model": "minilm-l6", "pruning": {"keep_ratio": 0.5, "speed": 2}}},
                     "spec", "Unknown field", id="unknown-spec-key"),
        pytest.param({**COMPRESSION, "spec": {"model": "minilm-l6", "pruning": {"drop_blocks": 2}}},
                     "spec", "Only resnet50 has residual blocks", id="drop-blocks-not-resnet"),
        pytest.param({**COMPRESSION, "spec": {"model": "resnet50", "pruning": {"drop_blocks": 13}}},
                     "spec", "less than or equal to 12", id="drop-blocks-too-many"),
        pytest.param({**COMPRESSION, "spec": {"model": "minilm-l6", "quantization": {"rounding": "stochastic"}}},
                     "spec", "not a valid choice", id="unknown-rounding"),
        pytest.param({**COMPRESSION, "spec": {"model": "minilm-l6", "quantization": {"formats": ["int3"]}}},
                     "spec", "not a valid choice", id="unknown-weight-format"),
        pytest.param({**COMPRESSION, "spec": {"model": "minilm-l6", "quantization": {"linear_formats": []}}},
                     "spec", "at least 1", id="no-linear-formats"),
        pytest.param({**COMPRESSION, "spec": {"model": "minilm-l6",
                                              "quantization": {"mode": "preset", "formats": ["int8"]}}},
                     "spec", "chosen by the auto mode only", id="formats-without-auto"),
        pytest.param({**COMPRESSION, "spec": {"model": "minilm-l6", "quantization": {"max_quality_drop": 1.5}}},
                     "spec", "mean cosine (at most 1)", id="cosine-drop-over-its-scale"),
        pytest.param({**COMPRESSION, "spec": {"model": "digits-cnn", "quantization": {"max_quality_drop": 101}}},
                     "spec", "less than or equal to 100", id="accuracy-drop-over-100-points"),
        pytest.param({**COMPRESSION, "spec": {"model": "digits-cnn", "quantization": {"fp8_inputs": "static"}}},
                     "spec", "BERT encoders only", id="static-fp8-inputs-not-bert"),
        pytest.param({**COMPRESSION, "spec": {"model": "bert-base",
                                              "quantization": {"mode": "off", "fp8_inputs": "static"}}},
                     "spec", "need quantization", id="static-fp8-inputs-without-quantization"),
        pytest.param({**COMPRESSION, "spec": {"model": "bert-base", "quantization": {"fp8_inputs": "sometimes"}}},
                     "spec", "not a valid choice", id="unknown-fp8-inputs"),
        pytest.param({**COMPRESSION, "colour": "blue"}, "colour", "Unknown field", id="unknown-top-level-key"),
        pytest.param({**COMPRESSION, "name": ""}, "name", "blank", id="blank-name"),
    ],
)
def test_bad_input_is_a_400_naming_the_field_and_creates_nothing(cluster, body, field, words):
    before = counts()
    response = cluster["alice"].post("/api/v1/jobs/", {**body, "team": cluster["team_a"]["id"]})
    assert response.status_code == 400, response.content
    errors = response.json()
    assert field in errors, errors
    assert words in json.dumps(errors[field])
    assert counts() == before


def test_the_quality_budget_is_in_the_models_own_units_and_defaults_to_the_models(cluster):
    """digits-cnn's quality is top-1 in points, so 2 (points) is a valid budget there; a job that gives
    none stores none, and the runner then leaves the model's own default to the engine."""
    alice, team = cluster["alice"], cluster["team_a"]["id"]
    points = alice.post("/api/v1/jobs/", {**COMPRESSION, "team": team, "spec": {
        "model": "digits-cnn", "quantization": {"mode": "auto", "max_quality_drop": 2}}})
    assert points.status_code == 201, points.content
    assert points.json()["spec"]["quantization"]["max_quality_drop"] == 2
    default = alice.post("/api/v1/jobs/", {**COMPRESSION, "team": team, "spec": {"model": "digits-cnn"}})
    assert default.status_code == 201, default.content
    assert default.json()["spec"]["quantization"] == {"mode": "auto"}


def test_malformed_json_is_a_400_and_creates_nothing(cluster):
    before = counts()
    response = cluster["alice"].post("/api/v1/jobs/", data='{"name": "x", "kind": ', content_type="application/json")
    assert response.status_code == 400
    assert "JSON" in response.json()["detail"]
    assert counts() == before


def test_a_job_larger_than_the_cluster_can_ever_hold_is_a_400_that_says_so(cluster):
    staff, team_a = cluster["staff"], cluster["team_a"]
    raised = staff.patch(f"/api/v1/teams/{team_a['id']}/", {"max_gpus_per_job": 16})
    assert raised.status_code == 200
    assert raised.json()["max_gpus_per_job"] == 16
    before = counts()

    response = cluster["alice"].post("/api/v1/jobs/", {**COMPRESSION, "team": team_a["id"],
                                                       "resources": {"gpus": 12, "nodes": 1}})

    assert response.status_code == 400
    message = response.json()["resources"][0]
    assert "can ever hold" in message
    assert "8 GPUs" in message  # the largest node, so the user knows what would fit
    assert counts() == before


@pytest.mark.parametrize(
    ("spec", "path"),
    [
        pytest.param({"model": "digits-mlp", "hcof": {"inter_node": "topk:2"}}, ("hcof", "inter_node"),
                     id="topk-ratio-over-one"),
        pytest.param({"model": "digits-mlp", "hcof": {"intra_node": "zip"}}, ("hcof", "intra_node"),
                     id="unknown-codec"),
        pytest.param({"model": "digits-mlp", "hcof": {"inter_node": "powersgd:0"}}, ("hcof", "inter_node"),
                     id="powersgd-rank-zero"),
        pytest.param({"model": "digits-mlp", "steps": 0}, ("steps",), id="zero-steps"),
        pytest.param({"model": "digits-mlp", "learning_rate": 0.1}, ("learning_rate",), id="unknown-spec-key"),
        pytest.param({"model": "digits-mlp", "hcof": {"overlap": True, "fancy": 1}}, ("hcof", "fancy"),
                     id="unknown-hcof-key"),
        pytest.param({"model": "minilm-l6"}, ("model",), id="compression-model-in-a-training-job"),
    ],
)
def test_a_bad_training_spec_is_a_400_at_the_exact_field(cluster, spec, path):
    before = counts()
    body = {"name": "train", "kind": "training", "team": cluster["team_a"]["id"], "resources": {"gpus": 2},
            "spec": spec}
    response = cluster["alice"].post("/api/v1/jobs/", body)
    assert response.status_code == 400, response.content
    errors = response.json()["spec"]
    for key in path:
        errors = errors[key]
    assert isinstance(errors, list)
    assert errors
    assert all(isinstance(m, str) and m for m in errors)
    assert counts() == before


def test_a_good_training_spec_is_accepted_with_its_defaults_filled_in(cluster):
    body = {"name": "train", "kind": "training", "team": cluster["team_a"]["id"], "resources": {"gpus": 2},
            "spec": {"model": "digits-mlp", "hcof": {"inter_node": "topk:0.01"}}}
    job = created(cluster["alice"].post("/api/v1/jobs/", body))
    assert job["spec"]["hcof"] == {"intra_node": "none", "inter_node": "topk:0.01", "critical": "none",
                                   "overlap": True}
    assert job["spec"]["steps"] > 0


@pytest.mark.parametrize(
    ("query", "headers"),
    [
        pytest.param({}, {"HTTP_ACCEPT": "application/vnd.oai.openapi+json"}, id="accept-header"),
        pytest.param({"format": "json"}, {}, id="format-query"),
    ],
)
def test_the_schema_is_openapi_3_and_describes_the_api(query, headers):
    response = APIClient().get("/api/schema/", query, **headers)
    assert response.status_code == 200
    schema = json.loads(response.content)
    assert schema["openapi"].startswith("3.")
    for path in ("/api/v1/auth/token/", "/api/v1/teams/", "/api/v1/teams/{id}/members/", "/api/v1/users/",
                 "/api/v1/nodes/", "/api/v1/nodes/{id}/drain/", "/api/v1/jobs/", "/api/v1/jobs/{id}/cancel/",
                 "/api/v1/jobs/{id}/events/", "/api/v1/me/"):
        assert path in schema["paths"], path
    assert {"tokenAuth", "cookieAuth"} <= set(schema["components"]["securitySchemes"])


def test_the_api_docs_are_served_from_local_files_with_no_cdn():
    client = APIClient()
    response = client.get("/api/docs/")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/html")
    html = response.content.decode()
    for cdn in ("cdn.", "unpkg", "jsdelivr", "cdnjs", "googleapis"):
        assert cdn not in html, cdn
    assets = [a for a in ("swagger-ui-bundle.js", "swagger-ui-standalone-preset.js", "swagger-ui.css")
              if a in html]
    assert assets, "the page names no Swagger UI assets"
    for asset in assets:
        url = f"/static/drf_spectacular_sidecar/swagger-ui-dist/{asset}"
        assert url in html
        served = client.get(url)
        assert served.status_code == 200, url
        assert len(b"".join(served.streaming_content) if served.streaming else served.content) > 1000


def test_cancel_works_once_and_a_second_cancel_is_409(cluster):
    alice = cluster["alice"]
    job = created(alice.post("/api/v1/jobs/", {**COMPRESSION, "team": cluster["team_a"]["id"]}))

    first = alice.post(f"/api/v1/jobs/{job['id']}/cancel/")
    assert first.status_code == 200
    assert first.json()["state"] == "cancelled"

    events_before = JobEvent.objects.count()
    second = alice.post(f"/api/v1/jobs/{job['id']}/cancel/")
    assert second.status_code == 409
    assert second.json()["state"] == "cancelled"
    assert second.json()["detail"]
    assert JobEvent.objects.count() == events_before
    assert [e["to_state"] for e in alice.get(f"/api/v1/jobs/{job['id']}/events/").json()["results"]] == [
        "queued", "cancelled"]


def test_the_openapi_schema_generates_without_a_warning(tmp_path):
    """drf-spectacular's own check, as strict as it goes: every view, serializer and enum is described
    (a warning means a client generator would see a guessed or clashing type)."""
    from django.core.management import call_command

    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(tmp_path / "schema.yaml"))
    text = (tmp_path / "schema.yaml").read_text()
    assert "/api/v1/models/:" in text
    assert "CompressionModelEnum" in text


@pytest.mark.parametrize("team", ["team\x00a", "²", "١٢", "a b", "x" * 300])
def test_a_team_that_cannot_be_a_slug_or_an_id_is_a_400_not_a_query(cluster, team):
    """A NUL byte reached PostgreSQL (a 500 there: text cannot hold it) and "²" passed str.isdigit() but not
    int(); neither can name a team, so they answer as any unknown team does, without a query."""
    before = counts()
    response = cluster["alice"].post("/api/v1/jobs/", {**COMPRESSION, "team": team})
    assert response.status_code == 400, response.content
    assert "that you belong to" in json.dumps(response.json()["team"])
    assert counts() == before


@pytest.mark.parametrize("key", ["ab\x00cd", "\u00b2" * 40])
def test_a_token_header_that_cannot_be_a_key_is_a_401(cluster, key):
    from rest_framework.test import APIClient

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    assert client.get("/api/v1/jobs/").status_code == 401


def test_a_member_username_with_a_nul_byte_is_a_400_not_a_query(cluster):
    """The schema fuzzer found it on PostgreSQL: the username lookup sent the NUL to the database (a 500)."""
    team = cluster["team_a"]
    response = cluster["staff"].post(f"/api/v1/teams/{team['id']}/members/", {"username": "ali\x00ce"})
    assert response.status_code == 400, response.content
    assert response.json() == {"username": ["Null characters are not allowed."]}
