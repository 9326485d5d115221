"""A team's own model weights: the safetensors check, `POST/GET /api/v1/models/`, a compression job's
`spec.weights`, the agent's download for the node the attempt is allocated to, and the runner's command."""
from __future__ import annotations

import io
import json

import pytest
import torch
from django.core.files.uploadedfile import SimpleUploadedFile
from safetensors.torch import save

from apps.cluster.services import register_node
from apps.scheduling import safetensors_check
from apps.scheduling.models import ModelUpload
from tests.unit.test_agent_api import allocate, node_client

pytestmark = pytest.mark.django_db

TENSORS = {"features.0.weight": torch.randn(4, 1, 3, 3), "features.0.bias": torch.zeros(4)}


def safetensors_bytes(tensors: dict | None = None) -> bytes:
    return save(tensors or TENSORS)


def pickle_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save(TENSORS, buffer)
    return buffer.getvalue()


@pytest.fixture
def media(settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path / "media"
    return settings.MEDIA_ROOT


def upload(client, team, content: bytes, arch: str = "digits-cnn", name: str = "mine.safetensors"):  # noqa: ANN001, ANN201
    return client.post("/api/v1/models/", {"file": SimpleUploadedFile(name, content), "arch": arch, "team": team.pk},
                       format="multipart")


# --- the check ------------------------------------------------------------------------------------

def test_a_real_safetensors_file_passes_and_its_tensors_are_counted():
    data = safetensors_bytes()
    assert safetensors_check.check(io.BytesIO(data), len(data)) == 2


@pytest.mark.parametrize(("content", "words"), [
    (pickle_bytes(), "pickle"),
    (b"\x80\x04\x95" + b"\x00" * 20, "pickle"),
    (b"abc", "too short"),
    ((10**9).to_bytes(8, "little") + b"{}", "header of 1000000000 bytes"),
    ((7).to_bytes(8, "little") + b"not json", "not JSON"),
    ((2).to_bytes(8, "little") + b"[]", "not a JSON object"),
    ((2).to_bytes(8, "little") + b"{}", "no tensors"),
])
def test_anything_else_is_refused_with_the_reason(content: bytes, words: str):
    with pytest.raises(safetensors_check.NotSafetensors, match=words):
        safetensors_check.check(io.BytesIO(content), len(content))


def test_a_header_whose_byte_ranges_do_not_fit_the_data_is_refused():
    good = safetensors_bytes()
    length = int.from_bytes(good[:8], "little")
    header = json.loads(good[8:8 + length])
    header["features.0.bias"]["data_offsets"] = [0, 10_000]  # past the end of the file
    text = json.dumps(header).encode()
    bad = len(text).to_bytes(8, "little") + text + good[8 + length:]
    with pytest.raises(safetensors_check.NotSafetensors, match="features.0.bias"):
        safetensors_check.check(io.BytesIO(bad), len(bad))


# --- the API ---------------------------------------------------------------------------------------

def test_a_member_uploads_weights_which_only_their_team_sees(media, alice, bob, charlie, team_a, client_for):
    response = upload(client_for(alice), team_a, safetensors_bytes())
    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["arch"], body["tensors"], body["name"], body["team"]) == ("digits-cnn", 2, "mine.safetensors",
                                                                          team_a.pk)
    stored = ModelUpload.objects.get(pk=body["id"])
    assert stored.file.path.startswith(str(media))
    assert stored.size == len(safetensors_bytes())  # the same shapes, so the same size
    assert [m["id"] for m in client_for(bob).get("/api/v1/models/").json()["results"]] == [body["id"]]
    assert client_for(charlie).get("/api/v1/models/").json()["results"] == []
    assert client_for(charlie).get(f"/api/v1/models/{body['id']}/").status_code == 404
    assert client_for(None).get("/api/v1/models/").status_code == 401


@pytest.mark.parametrize(("content", "arch", "field", "words"), [
    (pickle_bytes(), "digits-cnn", "file", "only safetensors is accepted"),
    (b"hello world, not a model", "digits-cnn", "file", "Not a safetensors file"),
    (safetensors_bytes(), "gpt-17", "arch", "not a valid choice"),
])
def test_a_bad_upload_is_a_400_naming_the_field_and_keeps_nothing(media, alice, team_a, client_for, content, arch,
                                                                   field, words):
    response = upload(client_for(alice), team_a, content, arch=arch)
    assert response.status_code == 400
    assert words in json.dumps(response.json()[field])
    assert not ModelUpload.objects.exists()
    assert not [f for f in media.rglob("*") if f.is_file()]  # no file written either


def test_another_teams_id_is_not_a_team_you_can_upload_to(media, charlie, team_a, client_for):
    response = upload(client_for(charlie), team_a, safetensors_bytes())
    assert response.status_code == 400
    assert "that you belong to" in json.dumps(response.json()["team"])


# --- a job's spec.weights ----------------------------------------------------------------------------

def compression(team, weights: int, model: str = "digits-cnn") -> dict:  # noqa: ANN001
    return {"name": "mine", "team": team.pk, "kind": "compression", "resources": {"gpus": 1},
            "spec": {"model": model, "weights": weights, "quantization": {"mode": "preset"}}}


def test_a_compression_job_names_its_teams_upload_of_the_same_arch(media, alice, charlie, team_a, team_b, node_a,
                                                                   client_for):
    mine = upload(client_for(alice), team_a, safetensors_bytes()).json()["id"]
    ok = client_for(alice).post("/api/v1/jobs/", compression(team_a, mine), format="json")
    assert ok.status_code == 201, ok.content
    assert ok.json()["spec"]["weights"] == mine
    wrong_arch = client_for(alice).post("/api/v1/jobs/", compression(team_a, mine, "minilm-l6"), format="json")
    assert wrong_arch.status_code == 400
    assert "holds digits-cnn weights, not minilm-l6" in json.dumps(wrong_arch.json()["spec"])
    # Another team's upload is not there for charlie's team, whether or not it exists.
    theirs = client_for(charlie).post("/api/v1/jobs/", compression(team_b, mine), format="json")
    assert theirs.status_code == 400
    assert f"No uploaded model {mine} in team" in json.dumps(theirs.json()["spec"])


# --- the agent's download -------------------------------------------------------------------------

def gpu_node(team, name: str):  # noqa: ANN001, ANN201
    return register_node(team=team, name=name, hostname=f"{name}.example", rack="r1",
                         gpus=[{"index": i, "model": "NVIDIA H200", "memory_mb": 143_771} for i in range(4)])


def test_only_the_node_the_attempt_is_allocated_to_fetches_the_weights(media, alice, team_a, team_b, client_for):
    from apps.scheduling.models import Job

    node_one, node_two = gpu_node(team_a, "gpu-one"), gpu_node(team_b, "gpu-two")

    content = safetensors_bytes()
    mine = upload(client_for(alice), team_a, content).json()["id"]
    job_id = client_for(alice).post("/api/v1/jobs/", compression(team_a, mine), format="json").json()["id"]
    job = allocate(Job.objects.get(pk=job_id), (node_one[0], [0]))
    url = f"/api/v1/agent/jobs/{job.pk}/attempts/1/weights/"
    got = node_client(node_one[1]).get(url)
    assert got.status_code == 200
    assert b"".join(got.streaming_content) == content
    assert node_client(node_two[1]).get(url).status_code == 404
    assert client_for(alice).get(url).status_code in (401, 403)  # a user token is not a node's


def test_the_runner_compresses_the_fetched_file_for_the_arch(tmp_path):
    from workers.runner import build_command, weights_path

    payload = {"kind": "compression", "job": 7, "attempt": 1, "gpu_indexes": [], "device_type": "cpu",
               "spec": {"model": "digits-cnn", "weights": 3, "quantization": {"mode": "preset"}}}
    out = tmp_path / "attempt" / "out"
    command = build_command(payload, out, tmp_path)
    text = " ".join(command)
    assert f"--upload {weights_path(out)} --arch digits-cnn" in text
    assert "--model" not in text
    assert weights_path(out) == tmp_path / "attempt" / "weights.safetensors"


# --- the pages ------------------------------------------------------------------------------------

def test_the_models_page_uploads_with_the_apis_checks_and_the_form_offers_the_upload(media, alice, charlie, team_a,
                                                                                     node_a, client):
    client.force_login(alice)
    refused = client.post("/models/", {"arch": "digits-cnn", "team": team_a.pk,
                                       "file": SimpleUploadedFile("model.pt", pickle_bytes())})
    assert refused.status_code == 400
    assert "only safetensors is accepted" in refused.content.decode()
    assert not ModelUpload.objects.exists()
    done = client.post("/models/", {"arch": "digits-cnn", "team": team_a.pk, "name": "my digits",
                                    "file": SimpleUploadedFile("mine.safetensors", safetensors_bytes())})
    assert done.status_code == 302
    mine = ModelUpload.objects.get()
    assert (mine.name, mine.arch, mine.team, mine.uploaded_by) == ("my digits", "digits-cnn", team_a, alice)
    listing = client.get("/models/").content.decode()
    assert "my digits" in listing
    form = client.get("/jobs/new/").content.decode()
    assert f'<option value="{mine.pk}">#{mine.pk} my digits (digits-cnn, {team_a.name})</option>' in form
    # The form's Weights reaches the job's spec.
    posted = client.post("/jobs/new/", {"name": "mine", "team": team_a.pk, "kind": "compression", "gpus": "1",
                                        "nodes": "1", "priority": "normal", "compression_model": "digits-cnn",
                                        "weights": str(mine.pk), "quantization_mode": "preset"})
    assert posted.status_code == 302, posted.content.decode()[:2000]
    from apps.scheduling.models import Job

    job = Job.objects.get()
    assert job.spec["weights"] == mine.pk
    page = client.get(f"/jobs/{job.pk}/").content.decode()
    assert f'data-testid="job-weights">#{mine.pk} my digits</a>' in page  # the Spec card names the upload
    client.force_login(charlie)
    assert "my digits" not in client.get("/models/").content.decode()
    assert "my digits" not in client.get("/jobs/new/").content.decode()


def test_an_upload_over_the_limit_is_refused_and_nothing_is_kept(media, alice, team_a, client_for, settings):
    settings.DEEPOPT_WORKERS = {**settings.DEEPOPT_WORKERS, "artifact_max_bytes": 1000}
    big = safetensors_bytes({"w": torch.zeros(40_000)})  # 160 kB: refused from its declared length alone
    response = upload(client_for(alice), team_a, big)
    assert response.status_code == 413
    assert "the model limit is 1000" in response.json()["detail"]
    over = safetensors_bytes({"w": torch.zeros(400)})  # 1.7 kB: past the limit, within the envelope's slack
    response = upload(client_for(alice), team_a, over)
    assert response.status_code == 400
    assert "the limit is 1000" in json.dumps(response.json()["file"])
    assert not ModelUpload.objects.exists()


def test_a_files_own_name_with_control_characters_is_cleaned_before_it_is_stored(media, alice, team_a, client_for):
    response = upload(client_for(alice), team_a, safetensors_bytes(), name="we\x00ights\x07.safetensors")
    assert response.status_code == 201, response.content
    assert response.json()["name"] == "weights.safetensors"
