from __future__ import annotations

import pytest

from apps.scheduling.models import Job, JobEvent
from tests.conftest import COMPRESSION_JOB

pytestmark = pytest.mark.django_db


def test_alice_submits_a_compression_job_and_sees_it_queued(alice, team_a, node_a, client_for):
    response = client_for(alice).post("/api/v1/jobs/", {**COMPRESSION_JOB, "team": team_a.pk}, format="json")
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["state"] == "queued"
    assert body["resources"] == {"gpus": 1, "nodes": 1, "gpu_memory_gb": None}
    assert body["spec"]["quantization"]["mode"] == "auto"
    events = list(JobEvent.objects.filter(job_id=body["id"]).values_list("to_state", flat=True))
    assert events == ["queued"]


def test_team_can_be_left_out_when_the_user_has_one_team(bob, node_a, client_for):
    payload = {k: v for k, v in COMPRESSION_JOB.items() if k != "team"}
    response = client_for(bob).post("/api/v1/jobs/", payload, format="json")
    assert response.status_code == 201, response.content


def test_a_training_job_takes_a_learning_rate_and_warm_up_or_leaves_them_to_the_runner(alice, team_a, node_a,
                                                                                        client_for):
    job = {**COMPRESSION_JOB, "team": team_a.pk, "kind": "training"}
    spec = {"model": "bert-base", "lr": 3e-4, "lr_warmup": 50}
    tuned = client_for(alice).post("/api/v1/jobs/", {**job, "spec": spec}, format="json")
    assert tuned.status_code == 201, tuned.content
    assert (tuned.json()["spec"]["lr"], tuned.json()["spec"]["lr_warmup"]) == (3e-4, 50)
    plain = client_for(alice).post("/api/v1/jobs/", {**job, "spec": {"model": "bert-base"}}, format="json")
    assert plain.status_code == 201, plain.content
    assert "lr" not in plain.json()["spec"]
    assert "lr_warmup" not in plain.json()["spec"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"kind": "mining"}, "kind"),
        ({"resources": {"gpus": -1}}, "resources"),
        ({"spec": {"model": "gpt-17"}}, "spec"),
        ({"spec": {"model": "minilm-l6", "pruning": {"keep_ration": 0.5}}}, "spec"),
        ({"priority": "whenever"}, "priority"),
        ({"resources": {"gpus": 9}}, "resources"),
        ({"resources": {"gpus": 4, "nodes": 3}}, "resources"),
        ({"kind": "training", "spec": {"model": "bert-base", "lr": 0}}, "spec"),
        ({"kind": "training", "spec": {"model": "bert-base", "lr_warmup": -5}}, "spec"),
    ],
)
def test_bad_input_is_a_400_with_field_messages_and_writes_nothing(alice, team_a, node_a, client_for, change, field):
    response = client_for(alice).post("/api/v1/jobs/", {**COMPRESSION_JOB, "team": team_a.pk, **change}, format="json")
    assert response.status_code == 400, response.content
    assert field in response.json()
    assert Job.objects.count() == 0


def test_malformed_json_is_a_400(alice, client_for):
    response = client_for(alice).post("/api/v1/jobs/", data="{not json", content_type="application/json")
    assert response.status_code == 400
    assert Job.objects.count() == 0


def test_a_job_larger_than_the_cluster_can_ever_hold_is_refused(alice, team_a, node_a, client_for):
    team_a.max_gpus_per_job = 64
    team_a.max_gpus = 64
    team_a.save()
    payload = {**COMPRESSION_JOB, "team": team_a.pk, "kind": "training",
               "spec": {"model": "digits-mlp"}, "resources": {"gpus": 16, "nodes": 2}}
    response = client_for(alice).post("/api/v1/jobs/", payload, format="json")
    assert response.status_code == 400
    assert "can ever hold" in response.json()["resources"][0]


def test_cancel_works_once_and_a_second_cancel_is_409(alice, job_of_alice, client_for):
    client = client_for(alice)
    first = client.post(f"/api/v1/jobs/{job_of_alice.pk}/cancel/")
    assert first.status_code == 200
    assert first.json()["state"] == "cancelled"
    second = client.post(f"/api/v1/jobs/{job_of_alice.pk}/cancel/")
    assert second.status_code == 409
    assert second.json()["state"] == "cancelled"
    events = client.get(f"/api/v1/jobs/{job_of_alice.pk}/events/").json()["results"]
    assert [e["to_state"] for e in events] == ["queued", "cancelled"]


def test_charlie_gets_404_on_alices_job_and_does_not_list_it(charlie, job_of_alice, client_for):
    client = client_for(charlie)
    assert client.get(f"/api/v1/jobs/{job_of_alice.pk}/").status_code == 404
    assert client.post(f"/api/v1/jobs/{job_of_alice.pk}/cancel/").status_code == 404
    assert client.get("/api/v1/jobs/").json()["count"] == 0


def test_no_credentials_is_401(client_for):
    assert client_for(None).get("/api/v1/jobs/").status_code == 401
