"""A reusable API permission suite: every endpoint × every persona → the status it must answer.

In the spirit of NetBox's `utilities/testing/api.py`: the rules live in one declarative table, and one
generic check runs each row. A new endpoint is one more `Endpoint(...)` in `ENDPOINTS`; a test module
parametrizes over `permission_cases()` and calls `check_permission_case(...)`.

The world every case runs in: all objects the table acts on belong to team A.

- anonymous: no credentials → 401 everywhere.
- alice: lead of team A — reads her team, manages its members and nodes, submits and cancels jobs.
- bob: member of team A — reads and submits; 403 on cancelling Alice's job and on managing members and nodes: he can
  see the object, so a 403 reveals nothing.
- charlie: member of team B — another team's object is a 404, never a 403.
- dana: staff — acts on every team.

A refused request must also write nothing: `check_permission_case` compares a fingerprint of the
database (row counts and the states a request could change) before and after every 4xx.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone
from rest_framework.test import APIClient

from apps.accounts.models import Membership, Team
from apps.accounts.services import create_user
from apps.cluster.models import Gpu, GpuNode
from apps.forecasting.models import ScalingDecision, Series
from apps.scheduling.models import Allocation, Job, JobEvent, ModelUpload, QueueEntry

PERSONAS = ("anonymous", "alice", "bob", "charlie", "dana")


@dataclass
class World:
    """The objects a case refers to by name in its path and body."""

    team_a: Team
    team_b: Team
    users: dict[str, Any]
    node_a: GpuNode
    node_b: GpuNode
    job_a: Job
    job_b: Job
    # A user on no team, for the member endpoints to add.
    newcomer: Any
    # Each team's allocated-GPUs series, and one scaling decision about each team's node.
    series_a: Any = None
    series_b: Any = None
    decision_a: Any = None
    decision_b: Any = None
    # Each team's uploaded model weights.
    upload_a: Any = None
    upload_b: Any = None

    def user(self, persona: str):  # noqa: ANN201
        return None if persona == "anonymous" else self.users[persona]

    def ids(self) -> dict[str, int]:
        return {"team_a": self.team_a.pk, "node_a": self.node_a.pk, "job_a": self.job_a.pk,
                "bob": self.users["bob"].pk, "series_a": self.series_a.pk, "upload_a": self.upload_a.pk}


def build_world(*, team_a, team_b, alice, bob, charlie, dana, node_a, node_b) -> World:  # noqa: ANN001
    from apps.scheduling.services import submit_job

    spec = {"model": "minilm-l6", "quantization": {"mode": "auto", "max_quality_drop": 0.01},
            "pruning": {"keep_ratio": 0.7}}
    job_a = submit_job(submitter=alice, team=team_a, name="a's job", kind="compression", spec=spec)
    job_b = submit_job(submitter=charlie, team=team_b, name="b's job", kind="compression", spec=spec)
    # What a scheduler pass would have written (tests run no pass: nothing commits).
    for position, job in enumerate((job_a, job_b), start=1):
        QueueEntry.objects.create(job=job, position=position, flow=job.team.slug, start_tag=0.0,
                                  finish_tag=float(position), reason="Waiting.", code="waiting",
                                  updated_at=timezone.now())
    newcomer = create_user(username="erin", password="erin-pass-123")
    series = {team: Series.objects.create(key=f"team:{team.pk}:allocated_gpus", scope="team",
                                          metric="allocated_gpus", team=team) for team in (team_a, team_b)}
    decisions = {node: ScalingDecision.objects.create(action="standby", node=node, node_name=node.name,
                                                      reason="idle", forecast_peak=0.0, active_capacity=12)
                 for node in (node_a, node_b)}
    from django.core.files.base import ContentFile

    uploads = {team: ModelUpload.objects.create(team=team, name=f"{team.slug} weights", arch="digits-cnn",
                                                file=ContentFile(_safetensors(), name="model.safetensors"),
                                                size=len(_safetensors()), sha256="0" * 64, tensors=1)
               for team in (team_a, team_b)}
    return World(team_a=team_a, team_b=team_b,
                 users={"alice": alice, "bob": bob, "charlie": charlie, "dana": dana},
                 node_a=node_a, node_b=node_b, job_a=job_a, job_b=job_b, newcomer=newcomer,
                 series_a=series[team_a], series_b=series[team_b],
                 decision_a=decisions[node_a], decision_b=decisions[node_b],
                 upload_a=uploads[team_a], upload_b=uploads[team_b])


def _safetensors() -> bytes:
    """A real safetensors file of one float32 scalar (what the upload check reads), without torch."""
    header = b'{"w":{"dtype":"F32","shape":[],"data_offsets":[0,4]}}'
    return len(header).to_bytes(8, "little") + header + b"\x00\x00\x80\x3f"


Body = dict | Callable[[World], dict] | None


@dataclass(frozen=True)
class Endpoint:
    """One operation of the API and what each persona gets from it.

    `path` is formatted with the world's ids: `{team_a}`, `{node_a}`, `{job_a}`, `{bob}`.
    `expect` maps every persona in PERSONAS to a status code; leaving one out is an error, so a new
    persona forces a decision on every endpoint.
    """

    name: str
    method: str
    path: str
    expect: dict[str, int]
    body: Body = None
    marks: tuple = field(default_factory=tuple)
    format: str = "json"  # or "multipart" (file uploads)

    def url(self, world: World) -> str:
        return self.path.format(**world.ids())

    def payload(self, world: World) -> dict | None:
        return self.body(world) if callable(self.body) else self.body


def _expect(anonymous: int, alice: int, bob: int, charlie: int, dana: int) -> dict[str, int]:
    return {"anonymous": anonymous, "alice": alice, "bob": bob, "charlie": charlie, "dana": dana}


def _job_body(world: World) -> dict:
    return {"name": "perm check", "team": world.team_a.pk, "kind": "compression",
            "resources": {"gpus": 1, "nodes": 1}, "spec": {"model": "minilm-l6"}}


def _node_body(world: World) -> dict:
    return {"name": "a-node-new", "hostname": "a-new.example", "team": world.team_a.pk, "rack": "r1",
            "gpus": [{"index": 0, "model": "NVIDIA H200", "memory_mb": 143_771}]}


def _upload_body(world: World) -> dict:
    from django.core.files.uploadedfile import SimpleUploadedFile

    return {"file": SimpleUploadedFile("perm.safetensors", _safetensors()), "arch": "digits-cnn",
            "team": world.team_a.pk}


def _member_body(world: World) -> dict:
    return {"username": world.newcomer.username, "role": "member"}


_TEAM_BODY = {"name": "Team New", "weight": 1.5, "max_gpus": 4, "gpu_hours_per_month": 100,
              "max_gpus_per_job": 2}
_USER_BODY = {"username": "frank", "password": "frank-pass-123", "email": "frank@example.com"}

# Charlie asking to create something in team A: the team field says "no team 'N' that you belong
# to", exactly as for a team id that does not exist, so the answer is a 400 that reveals nothing.
ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("me", "get", "/api/v1/me/", _expect(401, 200, 200, 200, 200)),
    Endpoint("teams-list", "get", "/api/v1/teams/", _expect(401, 200, 200, 200, 200)),
    Endpoint("teams-detail", "get", "/api/v1/teams/{team_a}/", _expect(401, 200, 200, 404, 200)),
    Endpoint("teams-create", "post", "/api/v1/teams/", _expect(401, 403, 403, 403, 201), body=_TEAM_BODY),
    Endpoint("teams-update", "patch", "/api/v1/teams/{team_a}/", _expect(401, 403, 403, 403, 200),
             body={"max_gpus": 6}),
    Endpoint("teams-replace", "put", "/api/v1/teams/{team_a}/", _expect(401, 403, 403, 403, 200),
             body={**_TEAM_BODY, "name": "Team A"}),
    Endpoint("teams-members-list", "get", "/api/v1/teams/{team_a}/members/", _expect(401, 200, 200, 404, 200)),
    Endpoint("teams-members-add", "post", "/api/v1/teams/{team_a}/members/", _expect(401, 201, 403, 404, 201),
             body=_member_body),
    Endpoint("teams-members-remove", "delete", "/api/v1/teams/{team_a}/members/bob/",
             _expect(401, 204, 403, 404, 204)),
    Endpoint("users-list", "get", "/api/v1/users/", _expect(401, 403, 403, 403, 200)),
    Endpoint("users-detail", "get", "/api/v1/users/{bob}/", _expect(401, 403, 403, 403, 200)),
    Endpoint("users-create", "post", "/api/v1/users/", _expect(401, 403, 403, 403, 201), body=_USER_BODY),
    Endpoint("nodes-list", "get", "/api/v1/nodes/", _expect(401, 200, 200, 200, 200)),
    Endpoint("nodes-detail", "get", "/api/v1/nodes/{node_a}/", _expect(401, 200, 200, 404, 200)),
    Endpoint("nodes-create", "post", "/api/v1/nodes/", _expect(401, 201, 403, 400, 201), body=_node_body),
    Endpoint("nodes-drain", "post", "/api/v1/nodes/{node_a}/drain/", _expect(401, 200, 403, 404, 200)),
    Endpoint("nodes-activate", "post", "/api/v1/nodes/{node_a}/activate/", _expect(401, 200, 403, 404, 200)),
    Endpoint("jobs-list", "get", "/api/v1/jobs/", _expect(401, 200, 200, 200, 200)),
    Endpoint("jobs-detail", "get", "/api/v1/jobs/{job_a}/", _expect(401, 200, 200, 404, 200)),
    Endpoint("jobs-create", "post", "/api/v1/jobs/", _expect(401, 201, 201, 400, 201), body=_job_body),
    Endpoint("jobs-cancel", "post", "/api/v1/jobs/{job_a}/cancel/", _expect(401, 200, 403, 404, 200)),
    Endpoint("jobs-hold", "post", "/api/v1/jobs/{job_a}/hold/", _expect(401, 200, 403, 404, 200)),
    Endpoint("jobs-release", "post", "/api/v1/jobs/{job_a}/release/", _expect(401, 200, 403, 404, 200)),
    Endpoint("jobs-events", "get", "/api/v1/jobs/{job_a}/events/", _expect(401, 200, 200, 404, 200)),
    Endpoint("queue-list", "get", "/api/v1/queue/", _expect(401, 200, 200, 200, 200)),
    Endpoint("usage-list", "get", "/api/v1/usage/", _expect(401, 200, 200, 200, 200)),
    Endpoint("models-list", "get", "/api/v1/models/", _expect(401, 200, 200, 200, 200)),
    Endpoint("models-detail", "get", "/api/v1/models/{upload_a}/", _expect(401, 200, 200, 404, 200)),
    Endpoint("models-create", "post", "/api/v1/models/", _expect(401, 201, 201, 400, 201), body=_upload_body,
             format="multipart"),
    Endpoint("forecasts-list", "get", "/api/v1/forecasts/", _expect(401, 200, 200, 200, 200)),
    Endpoint("forecasts-detail", "get", "/api/v1/forecasts/{series_a}/", _expect(401, 200, 200, 404, 200)),
    Endpoint("scaling-decisions-list", "get", "/api/v1/scaling-decisions/", _expect(401, 200, 200, 200, 200)),
)


def permission_cases(endpoints: tuple[Endpoint, ...] = ENDPOINTS) -> list:
    """One pytest.param per (endpoint, persona), with ids like `jobs-cancel-charlie`."""
    cases = []
    for endpoint in endpoints:
        missing = set(PERSONAS) - set(endpoint.expect)
        if missing:
            raise ValueError(f"{endpoint.name} says nothing about {sorted(missing)}")
        for persona in PERSONAS:
            cases.append(pytest.param(endpoint, persona, endpoint.expect[persona],
                                      id=f"{endpoint.name}-{persona}", marks=endpoint.marks))
    return cases


def fingerprint() -> dict:
    """What any endpoint in the table could change; a refused request must leave all of it alone."""
    return {
        "users": get_user_model().objects.count(),
        "teams": list(Team.objects.order_by("pk").values_list(
            "pk", "name", "weight", "max_gpus", "gpu_hours_per_month", "max_gpus_per_job")),
        "memberships": sorted(Membership.objects.values_list("team_id", "user_id", "role")),
        "nodes": list(GpuNode.objects.order_by("pk").values_list("pk", "state")),
        "gpus": Gpu.objects.count(),
        "jobs": list(Job.objects.order_by("pk").values_list("pk", "state", "attempt")),
        "events": JobEvent.objects.count(),
        "allocations": Allocation.objects.count(),
        "model_uploads": ModelUpload.objects.count(),
    }


def client_as(world: World, persona: str) -> APIClient:
    from rest_framework.authtoken.models import Token

    client = APIClient()
    user = world.user(persona)
    if user is not None:
        token, _ = Token.objects.get_or_create(user=user)
        client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client


def check_permission_case(world: World, endpoint: Endpoint, persona: str, expected: int) -> None:
    # Tokens are made before the snapshot: the anonymous case must not count them as writes.
    client = client_as(world, persona)
    before = fingerprint()
    response = getattr(client, endpoint.method)(endpoint.url(world), endpoint.payload(world), format=endpoint.format)
    assert response.status_code == expected, (
        f"{persona} {endpoint.method.upper()} {endpoint.url(world)}: expected {expected}, "
        f"got {response.status_code}: {response.content[:300]!r}"
    )
    if expected >= 400:
        assert fingerprint() == before, f"a refused {endpoint.name} by {persona} changed the database"
        if response.content:
            assert response["Content-Type"].startswith("application/json")
    if expected == 404:
        # The body must not tell a hidden object from a missing one.
        assert "permission" not in response.content.decode().lower()


# Lists: what each persona must (and must not) find of the world's objects. Each entry: the path, the
# ids of (team A's object, team B's object), and how a row names its object.
LIST_ENDPOINTS: dict[str, tuple[str, Callable[[World], tuple[int, int]], Callable[[dict], int]]] = {
    "teams": ("/api/v1/teams/", lambda w: (w.team_a.pk, w.team_b.pk), lambda row: row["id"]),
    "nodes": ("/api/v1/nodes/", lambda w: (w.node_a.pk, w.node_b.pk), lambda row: row["id"]),
    "jobs": ("/api/v1/jobs/", lambda w: (w.job_a.pk, w.job_b.pk), lambda row: row["id"]),
    "queue": ("/api/v1/queue/", lambda w: (w.job_a.pk, w.job_b.pk), lambda row: row["job"]["id"]),
    "usage": ("/api/v1/usage/", lambda w: (w.team_a.pk, w.team_b.pk), lambda row: row["team"]),
    "forecasts": ("/api/v1/forecasts/", lambda w: (w.series_a.pk, w.series_b.pk), lambda row: row["id"]),
    "models": ("/api/v1/models/", lambda w: (w.upload_a.pk, w.upload_b.pk), lambda row: row["id"]),
    "scaling-decisions": ("/api/v1/scaling-decisions/", lambda w: (w.decision_a.pk, w.decision_b.pk),
                          lambda row: row["id"]),
}
# Which of (team A's object, team B's object) each persona sees.
LIST_VISIBILITY = {
    "alice": (True, False),
    "bob": (True, False),
    "charlie": (False, True),
    "dana": (True, True),
}


def list_cases() -> list:
    return [pytest.param(name, persona, id=f"{name}-{persona}")
            for name in LIST_ENDPOINTS for persona in LIST_VISIBILITY]


def check_list_scoping(world: World, name: str, persona: str) -> None:
    path, ids_of, id_of_row = LIST_ENDPOINTS[name]
    response = client_as(world, persona).get(path, {"page_size": 200})
    assert response.status_code == 200
    body = response.json()
    listed = {id_of_row(row) for row in body["results"]}
    assert body["count"] == len(body["results"]), "the test world fits on one page"
    a_id, b_id = ids_of(world)
    sees_a, sees_b = LIST_VISIBILITY[persona]
    assert (a_id in listed) is sees_a, f"{persona} and team A's {name}"
    assert (b_id in listed) is sees_b, f"{persona} and team B's {name}"
