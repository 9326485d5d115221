"""The server-rendered pages: login, team isolation as in the API, the submission form with the API's
validation, cancel, drain/activate, and query counts that do not grow with the data."""
from __future__ import annotations

import html as htmllib
import re

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from apps.accounts.models import Team
from apps.cluster.services import register_node
from apps.scheduling import services
from apps.scheduling.models import Allocation, Job

GOOD_COMPRESSION = {
    "name": "quantize minilm from the form",
    "kind": "compression",
    "priority": "high",
    "gpus": "1",
    "nodes": "1",
    "gpu_memory_gb": "",
    "walltime_minutes": "",
    "compression_model": "minilm-l6",
    "quantization_mode": "auto",
    "max_quality_drop": "0.02",
    "keep_ratio": "0.5",
}
GOOD_TRAINING = {
    "name": "train gpt2 with hcof",
    "kind": "training",
    "priority": "normal",
    "gpus": "2",
    "nodes": "1",
    "training_model": "gpt2-small",
    "steps": "500",
    "batch_size": "16",
    "hcof_intra_node": "bf16",
    "hcof_inter_node": "topk:0.01",
    "hcof_critical": "bf16",
    "hcof_overlap": "on",
}


def page_for(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def error_of(html: str, name: str) -> str:
    """The text of the error block shown next to input `name` ('' when there is none)."""
    match = re.search(rf'id="err_{name}">(.*?)</div>', html, re.S)
    return htmllib.unescape(re.sub(r"<[^>]+>", " ", match.group(1))).strip() if match else ""


def submit(client: Client, for_team: Team, **overrides):  # noqa: ANN201
    data = {**GOOD_COMPRESSION, "team": str(for_team.pk), **overrides}
    return client.post("/jobs/new/", {k: v for k, v in data.items() if v is not None})


# --- login ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("url", ["/", "/jobs/", "/jobs/new/", "/jobs/1/", "/nodes/", "/nodes/1/", "/teams/",
                                 "/teams/1/"])
def test_it_sends_anonymous_visitors_to_the_login_page(db, url):
    response = Client().get(url)
    assert response.status_code == 302
    assert response["Location"] == f"/login/?next={url}"


def test_it_logs_in_through_the_login_page_and_out_with_a_post(alice):
    client = Client()
    assert "Sign in" in client.get("/login/").content.decode()
    response = client.post("/login/", {"username": "alice", "password": "alice-pass-123"})
    assert response.status_code == 302
    assert response["Location"] == "/"
    assert client.get("/").status_code == 200
    assert client.post("/logout/").status_code == 302
    assert client.get("/").status_code == 302


def test_it_rejects_a_wrong_password_on_the_login_page(alice):
    response = Client().post("/login/", {"username": "alice", "password": "nope"})
    assert response.status_code == 200
    assert "Please enter a correct username and password" in response.content.decode()


# --- every page renders for its user -------------------------------------------------------------

def test_a_teammate_sees_a_job_but_only_its_submitter_or_a_lead_can_cancel_it(alice, bob, job_of_alice):
    bob_client = page_for(bob)
    assert "Cancel job" not in bob_client.get(f"/jobs/{job_of_alice.pk}/").content.decode()
    assert bob_client.post(f"/jobs/{job_of_alice.pk}/cancel/").status_code == 403
    job_of_alice.refresh_from_db()
    assert job_of_alice.state == "queued"
    assert "Cancel job" in page_for(alice).get(f"/jobs/{job_of_alice.pk}/").content.decode()


def test_every_page_renders_for_a_team_member(bob, job_of_alice, node_a, team_a):
    client = page_for(bob)
    pages = {
        "/": ["Dashboard", "Recent jobs", job_of_alice.name, "Team A"],
        "/jobs/": [job_of_alice.name],
        "/jobs/new/": ["Submit a job", "minilm-l6", "gpt2-small"],
        f"/jobs/{job_of_alice.pk}/": [job_of_alice.name, "Submitted.", "minilm-l6"],
        "/nodes/": [node_a.name],
        f"/nodes/{node_a.pk}/": [node_a.name, "NVIDIA H200"],
        "/teams/": ["Team A", "GPU-hours this month"],
        f"/teams/{team_a.pk}/": ["Team A", "alice", "bob", node_a.name, job_of_alice.name],
    }
    for url, expected in pages.items():
        response = client.get(url)
        assert response.status_code == 200, url
        html = response.content.decode()
        for text in expected:
            assert text in html, (url, text)
        assert "/static/css/deepopt.css" in html
        # No CDN, no external fonts: nothing on a page points off the server.
        assert not re.search(r'(src|href)="(https?:)?//', html), url


def test_the_nav_shows_admin_only_to_staff(bob, dana):
    assert 'href="/admin/"' not in page_for(bob).get("/").content.decode()
    assert 'href="/admin/"' in page_for(dana).get("/").content.decode()


def test_the_stylesheet_is_served_from_our_own_static_files(bob):
    response = page_for(bob).get("/static/css/deepopt.css")
    assert response.status_code == 200
    assert b".badge-queued" in b"".join(response.streaming_content)


def test_favicon_ico_leads_to_the_logo_for_pages_that_name_no_icon(db):
    # The admin's and Swagger's pages have no <link rel="icon">: the browser's /favicon.ico was a 404.
    response = Client().get("/favicon.ico")
    assert response.status_code == 301
    assert response["Location"] == "/static/img/logo.svg"
    logo = Client().get(response["Location"])
    assert logo.status_code == 200
    assert b"<svg" in b"".join(logo.streaming_content)


# --- team isolation ------------------------------------------------------------------------------

def test_charlie_gets_404_on_team_a_job_node_and_team_pages(charlie, job_of_alice, node_a, team_a):
    client = page_for(charlie)
    for url in (f"/jobs/{job_of_alice.pk}/", f"/nodes/{node_a.pk}/", f"/teams/{team_a.pk}/"):
        assert client.get(url).status_code == 404, url


def test_charlie_cannot_cancel_or_drain_team_a_objects(charlie, job_of_alice, node_a):
    client = page_for(charlie)
    assert client.post(f"/jobs/{job_of_alice.pk}/cancel/").status_code == 404
    assert client.post(f"/nodes/{node_a.pk}/state/", {"action": "drain"}).status_code == 404
    job_of_alice.refresh_from_db()
    node_a.refresh_from_db()
    assert job_of_alice.state == "queued"
    assert node_a.state == "active"


def test_charlie_does_not_see_team_a_in_any_list(charlie, job_of_alice, node_a, node_b):
    client = page_for(charlie)
    for url in ("/", "/jobs/", f"/jobs/?team={job_of_alice.team_id}", "/nodes/", "/teams/", "/jobs/new/"):
        html = client.get(url).content.decode()
        assert job_of_alice.name not in html, url
        assert node_a.name not in html, url
        assert "Team A" not in html, url
    assert node_b.name in client.get("/nodes/").content.decode()


def test_the_dashboard_counts_only_the_users_teams(charlie, job_of_alice, node_a, node_b):
    html = page_for(charlie).get("/").content.decode()
    assert re.search(r'data-stat="nodes">1<', html)
    assert re.search(r'data-stat="queued">0<', html)
    assert re.search(r'data-stat="gpus-free">4<', html)  # node_b's 4, not node_a's 8


def test_staff_see_every_team(dana, job_of_alice, node_a, node_b, team_a):
    client = page_for(dana)
    assert client.get(f"/jobs/{job_of_alice.pk}/").status_code == 200
    assert client.get(f"/teams/{team_a.pk}/").status_code == 200
    html = client.get("/nodes/").content.decode()
    assert node_a.name in html
    assert node_b.name in html


# --- jobs list filters and pagination --------------------------------------------------------------

def test_the_jobs_list_filters_by_state_kind_and_priority(alice, job_of_alice, team_a, node_a):
    other = services.submit_job(submitter=alice, team=team_a, name="train-me", kind="training", priority="urgent",
                                spec={"model": "digits-mlp"})
    client = page_for(alice)
    html = client.get("/jobs/?kind=training").content.decode()
    assert other.name in html
    assert job_of_alice.name not in html
    html = client.get("/jobs/?priority=normal").content.decode()
    assert job_of_alice.name in html
    assert other.name not in html
    services.cancel_job(other, actor=alice)
    html = client.get("/jobs/?state=cancelled").content.decode()
    assert other.name in html
    assert job_of_alice.name not in html
    html = client.get("/jobs/?q=TRAIN").content.decode()
    assert other.name in html
    assert job_of_alice.name not in html


def test_the_jobs_list_pages_by_50_and_keeps_the_filters(alice, team_a, node_a):
    Job.objects.bulk_create(Job(team=team_a, submitter=alice, name=f"bulk-{i:03d}", kind="training",
                                spec={"model": "digits-mlp"}) for i in range(60))
    client = page_for(alice)
    first = client.get("/jobs/?kind=training").content.decode()
    assert first.count('class="strong" href="/jobs/') == 50
    assert "?kind=training&amp;page=2" in first
    second = client.get("/jobs/?kind=training&page=2").content.decode()
    assert second.count('class="strong" href="/jobs/') == 10


# --- the submission form -------------------------------------------------------------------------

def test_a_good_form_queues_a_job_and_lands_on_its_page(alice, team_a, node_a):
    client = page_for(alice)
    response = submit(client, team_a)
    job = Job.objects.get()
    assert response.status_code == 302
    assert response["Location"] == f"/jobs/{job.pk}/"
    assert (job.state, job.team, job.submitter, job.priority) == ("queued", team_a, alice, "high")
    assert job.spec == {"model": "minilm-l6", "quantization": {"mode": "auto", "max_quality_drop": 0.02},
                        "pruning": {"keep_ratio": 0.5}}
    # Empty optional inputs were left out, so the API's defaults applied rather than "" errors.
    assert job.gpu_memory_gb is None
    assert job.walltime_minutes is None
    html = client.get(response["Location"]).content.decode()
    assert "is in the queue" in html
    assert 'data-testid="job-state"><span class="badge badge-queued">queued' in html


def test_a_blank_keep_ratio_means_no_pruning_as_in_the_api(alice, team_a, node_a):
    submit(page_for(alice), team_a, keep_ratio="")
    assert Job.objects.get().spec["pruning"] == {"keep_ratio": 1.0}


def test_the_form_chooses_how_int4_weights_are_rounded(alice, team_a, node_a):
    submit(page_for(alice), team_a, rounding="rtn")
    assert Job.objects.get().spec["quantization"]["rounding"] == "rtn"
    assert 'value="gptq" selected' in page_for(alice).get("/jobs/new/").content.decode()


def test_the_form_chooses_the_weight_formats(alice, team_a, node_a):
    submit(page_for(alice), team_a, format_preset="fp8-linear")
    quantization = Job.objects.get().spec["quantization"]
    assert quantization["linear_formats"] == ["fp8_e4m3"]
    assert quantization["formats"] == ["int8", "int4_g64"]
    Job.objects.all().delete()
    submit(page_for(alice), team_a, format_preset="")  # any format: the API's default candidates
    assert "formats" not in Job.objects.get().spec["quantization"]
    assert "linear_formats" not in Job.objects.get().spec["quantization"]
    assert 'id="id_format_preset"' in page_for(alice).get("/jobs/new/").content.decode()


def test_the_form_asks_for_static_fp8_inputs_where_the_model_has_them(alice, team_a, node_a):
    submit(page_for(alice), team_a, compression_model="bert-base", format_preset="fp8-static")
    quantization = Job.objects.get().spec["quantization"]
    assert quantization["fp8_inputs"] == "static"
    assert quantization["linear_formats"] == ["fp8_e4m3"]
    Job.objects.all().delete()
    response = submit(page_for(alice), team_a, compression_model="digits-cnn", format_preset="fp8-static")
    assert response.status_code == 400
    assert "BERT encoders only" in response.content.decode()
    assert not Job.objects.exists()


def test_the_form_asks_for_depth_pruning_of_a_resnet(alice, team_a, node_a):
    submit(page_for(alice), team_a, compression_model="resnet50", keep_ratio="0.5", drop_blocks="10")
    assert Job.objects.get().spec["pruning"] == {"keep_ratio": 0.5, "drop_blocks": 10}


def test_a_good_training_form_queues_a_training_job(alice, team_a, node_a):
    response = submit(page_for(alice), team_a, **{k: None for k in GOOD_COMPRESSION if k not in GOOD_TRAINING},
                      **GOOD_TRAINING)
    assert response.status_code == 302
    job = Job.objects.get()
    assert (job.kind, job.gpus) == ("training", 2)
    assert job.spec == {"model": "gpt2-small", "steps": 500, "batch_size": 16,
                        "hcof": {"intra_node": "bf16", "inter_node": "topk:0.01", "critical": "bf16",
                                 "overlap": True}}


def test_an_unchecked_overlap_box_turns_overlap_off(alice, team_a, node_a):
    submit(page_for(alice), team_a, **{**GOOD_TRAINING, "hcof_overlap": None})
    assert Job.objects.get().spec["hcof"]["overlap"] is False


def test_the_form_team_is_optional_for_a_user_on_one_team(bob, team_a, node_a):
    response = submit(page_for(bob), team_a, team="")
    assert response.status_code == 302
    assert Job.objects.get().team == team_a


@pytest.mark.parametrize(("overrides", "field", "message"), [
    ({"compression_model": "gpt-17"}, "compression_model", "is not a valid choice"),
    ({"gpus": "-2"}, "gpus", "greater than or equal to 1"),
    ({"gpus": "abc"}, "gpus", "A valid integer is required"),
    ({"gpus": "9"}, "resources", "limit of 8 GPUs per job"),
    ({"max_quality_drop": "3"}, "max_quality_drop", "mean cosine (at most 1)"),
    ({"max_quality_drop": "101", "compression_model": "digits-cnn"}, "max_quality_drop", "less than or equal to 100"),
    ({"keep_ratio": "0"}, "keep_ratio", "greater than or equal to 0.05"),
    ({"drop_blocks": "2"}, "drop_blocks", "Only resnet50 has residual blocks"),
    ({"rounding": "stochastic"}, "rounding", "is not a valid choice"),
    ({"format_preset": "int3"}, "format_preset", "is not a valid choice"),
    ({"format_preset": "integer", "quantization_mode": "preset"}, "format_preset", "chosen by the auto mode only"),
    ({"name": ""}, "name", "This field is required"),
    ({"nodes": "2", "gpus": "2"}, "resources", "A compression job runs on one node"),
    ({"team": "999999"}, "team", "No team '999999' that you belong to"),
])
def test_a_bad_form_shows_the_api_error_next_to_the_field_and_creates_nothing(
        alice, team_a, node_a, overrides, field, message):
    response = submit(page_for(alice), team_a, **overrides)
    assert response.status_code == 400
    html = response.content.decode()
    assert message in error_of(html, field), error_of(html, field) or html
    assert not Job.objects.exists()
    # The user's input is kept.
    assert f'value="{GOOD_COMPRESSION["name"]}"' in html or field == "name"


def test_the_training_form_takes_a_learning_rate_and_warm_up(alice, team_a, node_a):
    submit(page_for(alice), team_a, **{**GOOD_TRAINING, "lr": "3e-4", "lr_warmup": "50"})
    spec = Job.objects.get().spec
    assert (spec["lr"], spec["lr_warmup"]) == (3e-4, 50)


def test_a_negative_warm_up_is_shown_next_to_its_field(alice, team_a, node_a):
    response = submit(page_for(alice), team_a, **{**GOOD_TRAINING, "lr_warmup": "-3"})
    assert response.status_code == 400
    assert "greater than or equal to 0" in error_of(response.content.decode(), "lr_warmup")
    assert not Job.objects.exists()


def test_a_bad_training_codec_is_shown_next_to_its_field(alice, team_a, node_a):
    response = submit(page_for(alice), team_a, **{**GOOD_TRAINING, "hcof_inter_node": "zip"})
    assert response.status_code == 400
    assert "Use none, bf16, int8, int4" in error_of(response.content.decode(), "hcof_inter_node")
    assert 'value="zip"' in response.content.decode()
    assert not Job.objects.exists()


def test_charlie_cannot_submit_for_team_a_through_the_form(charlie, team_a, team_b, node_a, node_b):
    response = submit(page_for(charlie), team_a)
    assert response.status_code == 400
    assert "No team" in error_of(response.content.decode(), "team")
    assert not Job.objects.exists()


# --- cancel ------------------------------------------------------------------------------------

def test_the_cancel_button_cancels_once_and_then_says_why_not(alice, job_of_alice):
    client = page_for(alice)
    response = client.post(f"/jobs/{job_of_alice.pk}/cancel/", follow=True)
    job_of_alice.refresh_from_db()
    assert job_of_alice.state == "cancelled"
    html = response.content.decode()
    assert "was cancelled" in html
    assert "Cancel job</button>" not in html
    response = client.post(f"/jobs/{job_of_alice.pk}/cancel/", follow=True)
    assert "is cancelled; there is nothing to cancel" in response.content.decode()
    assert job_of_alice.events.filter(to_state="cancelled").count() == 1


def test_hold_and_release_buttons_keep_a_queued_job_back_and_let_it_go(alice, bob, charlie, job_of_alice):
    client = page_for(alice)
    page = client.get(f"/jobs/{job_of_alice.pk}/").content.decode()
    assert 'data-testid="hold-job"' in page
    response = client.post(f"/jobs/{job_of_alice.pk}/hold/", follow=True)
    html = response.content.decode()
    assert "is held: it stays queued until you release it" in html
    assert 'data-testid="release-job"' in html
    job_of_alice.refresh_from_db()
    assert (job_of_alice.held, job_of_alice.held_by) == (True, "alice")
    assert 'data-testid="held">held</span>' in client.get("/jobs/").content.decode()  # the list says so too
    assert page_for(bob).post(f"/jobs/{job_of_alice.pk}/hold/", {"release": "1"}).status_code == 403
    assert page_for(charlie).post(f"/jobs/{job_of_alice.pk}/hold/", {"release": "1"}).status_code == 404
    assert page_for(alice).get(f"/jobs/{job_of_alice.pk}/hold/").status_code == 405
    response = client.post(f"/jobs/{job_of_alice.pk}/hold/", {"release": "1"}, follow=True)
    assert "was released" in response.content.decode()
    job_of_alice.refresh_from_db()
    assert not job_of_alice.held
    client.post(f"/jobs/{job_of_alice.pk}/cancel/")
    response = client.post(f"/jobs/{job_of_alice.pk}/hold/", follow=True)
    html = response.content.decode()
    assert "is cancelled; only a queued job can be held or released" in html
    assert 'data-testid="hold-job"' not in html


def test_cancel_is_post_only(bob, job_of_alice):
    assert page_for(bob).get(f"/jobs/{job_of_alice.pk}/cancel/").status_code == 405


def test_cancel_needs_the_csrf_token(bob, job_of_alice):
    client = Client(enforce_csrf_checks=True)
    client.force_login(bob)
    assert client.post(f"/jobs/{job_of_alice.pk}/cancel/").status_code == 403
    job_of_alice.refresh_from_db()
    assert job_of_alice.state == "queued"


# --- nodes -------------------------------------------------------------------------------------

def test_a_lead_drains_and_activates_a_node(alice, node_a):
    client = page_for(alice)
    assert 'value="drain"' in client.get(f"/nodes/{node_a.pk}/").content.decode()
    response = client.post(f"/nodes/{node_a.pk}/state/", {"action": "drain"}, follow=True)
    node_a.refresh_from_db()
    assert node_a.state == "draining"
    assert "is draining" in response.content.decode()
    client.post(f"/nodes/{node_a.pk}/state/", {"action": "activate"})
    node_a.refresh_from_db()
    assert node_a.state == "active"


def test_a_member_sees_no_drain_button_and_cannot_drain(bob, node_a):
    client = page_for(bob)
    assert 'value="drain"' not in client.get(f"/nodes/{node_a.pk}/").content.decode()
    assert client.post(f"/nodes/{node_a.pk}/state/", {"action": "drain"}).status_code == 403
    node_a.refresh_from_db()
    assert node_a.state == "active"


def place(job: Job, node, count: int) -> None:
    """What the scheduler does: allocate GPUs to the job."""
    services.transition(job, Job.State.ALLOCATED)
    for gpu in node.gpus.order_by("index")[:count]:
        Allocation.objects.create(job=job, attempt=job.attempt, gpu=gpu, node=node)


def test_pages_show_busy_gpus_and_usage_against_quota(alice, job_of_alice, node_a, team_a):
    place(job_of_alice, node_a, 1)
    client = page_for(alice)
    dashboard = client.get("/").content.decode()
    assert re.search(r'data-stat="gpus-used">1<small> / 8', dashboard)
    assert re.search(r'data-stat="gpus-free">7<', dashboard)
    node_page = client.get(f"/nodes/{node_a.pk}/").content.decode()
    assert node_page.count("badge-busy") == 1
    assert f'href="/jobs/{job_of_alice.pk}/"' in node_page
    team_page = client.get(f"/teams/{team_a.pk}/").content.decode()
    assert re.search(r"GPUs in use</span><span class=\"meter-value\"><strong>1</strong> / 8", team_page)
    assert 'aria-valuemax="1000"' in team_page  # GPU-hours against gpu_hours_per_month


def test_the_node_page_hides_the_name_of_another_teams_job(alice, charlie, node_a, team_b):
    job = services.submit_job(submitter=charlie, team=team_b, name="secret-b-job", kind="training",
                              spec={"model": "digits-mlp"})
    place(job, node_a, 1)
    html = page_for(alice).get(f"/nodes/{node_a.pk}/").content.decode()
    assert "secret-b-job" not in html
    assert "another team's job" in html


# --- no N+1 ---------------------------------------------------------------------------------------

def queries_for(client: Client, url: str) -> int:
    with CaptureQueriesContext(connection) as ctx:
        assert client.get(url).status_code == 200
    return len(ctx.captured_queries)


def test_query_counts_do_not_grow_with_jobs_nodes_and_teams(alice, dana, job_of_alice, node_a, team_a):
    urls = ["/", "/jobs/", "/nodes/", "/teams/", f"/teams/{team_a.pk}/", f"/nodes/{node_a.pk}/",
            f"/jobs/{job_of_alice.pk}/"]
    before = {(who.username, url): queries_for(page_for(who), url) for who in (alice, dana) for url in urls}
    for i in range(3):
        team = Team.objects.create(name=f"Extra {i}")
        node, _ = register_node(team=team_a, name=f"a-extra-{i}", hostname="x", gpus=[
            {"index": g, "model": "NVIDIA H200", "memory_mb": 143_771} for g in range(4)])
        for j in range(5):
            job = services.submit_job(submitter=alice, team=team_a, name=f"more-{i}-{j}", kind="training",
                                      spec={"model": "digits-mlp"})
            services.transition(job, Job.State.CANCELLED)
        services.submit_job(submitter=dana, team=team, name=f"staff-{i}", kind="training",
                            spec={"model": "digits-mlp"})
    place(job_of_alice, node_a, 2)
    after = {(who.username, url): queries_for(page_for(who), url) for who in (alice, dana) for url in urls}
    assert after == before


def test_the_job_page_says_how_many_attempts_a_job_has_and_what_did_not_count(alice, job_of_alice):
    from apps.scheduling.models import Job

    def attempt_row() -> str:
        html = page_for(alice).get(f"/jobs/{job_of_alice.pk}/").content.decode()
        return re.sub(r"\s+", " ", html.split("<dt>Attempt</dt>", 1)[1].split("</dd>", 1)[0])

    assert attempt_row() == "<dd>1 of 3"
    # Attempts that never started are free (up to a limit), so a job can be past max_attempts.
    Job.objects.filter(pk=job_of_alice.pk).update(attempt=5)
    assert attempt_row() == ("<dd>5 (3 allowed; attempts that never started or that a worker shutdown stopped"
                             " use up none)")
    Job.objects.filter(pk=job_of_alice.pk).update(preemptions=2)
    assert attempt_row() == "<dd>5 (2 preemptions, which use up no attempt; 3 allowed)"


def test_the_form_takes_jobs_to_wait_for_and_the_job_page_names_them(alice, team_a, node_a):
    client = page_for(alice)
    submit(client, team_a, name="first")
    first = Job.objects.get()
    response = submit(client, team_a, name="second", depends_on=f" {first.pk}, ")
    assert response.status_code == 302
    second = Job.objects.get(name="second")
    assert list(second.depends_on.all()) == [first]
    html = client.get(f"/jobs/{second.pk}/").content.decode()
    row = html.split('data-testid="job-depends-on">', 1)[1].split("</dd>", 1)[0]
    assert f'<a href="/jobs/{first.pk}/">#{first.pk} first</a> (queued)' == row
    # A bad entry comes back next to the input, and nothing is submitted.
    response = submit(client, team_a, name="third", depends_on="12x")
    assert response.status_code == 400
    assert error_of(response.content.decode(), "depends_on") == "A valid integer is required."
    response = submit(client, team_a, name="third", depends_on="999999")
    assert error_of(response.content.decode(), "depends_on") == "No job 999999 that you can see."
    assert Job.objects.count() == 2
