"""The Django admin as an operator uses it: lists, search, filters, change pages, a read-only history."""
from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from apps.scheduling.models import Job, JobEvent
from apps.scheduling.services import submit_job, transition

pytestmark = pytest.mark.django_db

SPEC = {"model": "minilm-l6"}


@pytest.fixture
def admin_client_() -> Client:
    user = get_user_model().objects.create_superuser("root", "root@example.com", "root-pass-123")
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def jobs(alice, charlie, team_a, team_b, node_a, node_b) -> dict[str, Job]:  # noqa: ANN001
    resnet = submit_job(submitter=alice, team=team_a, name="prune resnet", kind="compression", spec=SPEC)
    transition(resnet, "allocated", message="placed on a-node-1")
    bert = submit_job(submitter=charlie, team=team_b, name="quantize bert", kind="compression", spec=SPEC)
    return {"resnet": resnet, "bert": bert}


def page(client: Client, url: str, **params) -> str:
    response = client.get(url, params)
    assert response.status_code == 200, f"{url} {params}: {response.status_code}"
    return response.content.decode()


@pytest.mark.parametrize(
    "url",
    ["/admin/", "/admin/accounts/team/", "/admin/accounts/membership/", "/admin/cluster/gpunode/",
     "/admin/cluster/gpu/", "/admin/scheduling/job/", "/admin/scheduling/jobevent/"],
)
def test_every_changelist_loads(admin_client_, jobs, url):
    page(admin_client_, url)


def test_the_team_page_shows_quotas_and_its_memberships_inline(admin_client_, jobs, team_a, bob):
    html = page(admin_client_, f"/admin/accounts/team/{team_a.pk}/change/")
    assert "Fair share and quotas" in html
    for field in ("weight", "max_gpus", "max_gpus_per_job", "gpu_hours_per_month"):
        assert f'name="{field}"' in html, field
    assert 'name="memberships-TOTAL_FORMS"' in html
    assert "bob" in html  # Bob's membership row


def test_a_team_quota_can_be_changed_from_the_admin(admin_client_, team_a, alice):
    response = admin_client_.post(f"/admin/accounts/team/{team_a.pk}/change/", {
        "name": team_a.name, "slug": team_a.slug, "weight": "3.5", "max_gpus": "12", "max_gpus_per_job": "6",
        "gpu_hours_per_month": "2000",
        "memberships-TOTAL_FORMS": "1", "memberships-INITIAL_FORMS": "1", "memberships-MIN_NUM_FORMS": "0",
        "memberships-MAX_NUM_FORMS": "1000", "memberships-0-id": str(alice.memberships.get().pk),
        "memberships-0-team": str(team_a.pk), "memberships-0-user": str(alice.pk), "memberships-0-role": "lead",
    })
    assert response.status_code == 302, response.content.decode()[:2000]
    team_a.refresh_from_db()
    assert (team_a.weight, team_a.max_gpus, team_a.max_gpus_per_job) == (3.5, 12, 6)


def test_node_and_gpu_change_pages_load(admin_client_, node_a):
    html = page(admin_client_, f"/admin/cluster/gpunode/{node_a.pk}/change/")
    assert 'name="gpus-TOTAL_FORMS"' in html
    assert 'name="token_hash"' not in html  # shown read-only, never edited by hand
    page(admin_client_, f"/admin/cluster/gpu/{node_a.gpus.first().pk}/change/")


def test_the_job_page_shows_its_events_read_only(admin_client_, jobs):
    job = jobs["resnet"]
    html = page(admin_client_, f"/admin/scheduling/job/{job.pk}/change/")
    assert "placed on a-node-1" in html
    # Read-only inline: the events are shown, but no form field edits or deletes them.
    assert 'name="events-0-message"' not in html
    assert 'name="events-0-DELETE"' not in html
    # State goes through the state machine, never through a form field.
    assert 'name="state"' not in html
    # Nor do dependencies: shown, never a multi-select of every job in the database.
    assert 'name="depends_on"' not in html


def test_the_job_page_shows_what_a_job_waits_for(admin_client_, jobs, alice, team_a):
    after = submit_job(submitter=alice, team=team_a, name="after resnet", kind="compression", spec=SPEC,
                       depends_on=[jobs["resnet"]])
    html = page(admin_client_, f"/admin/scheduling/job/{after.pk}/change/")
    assert f"#{jobs['resnet'].pk} prune resnet" in html
    assert 'name="depends_on"' not in html


def test_job_search_finds_by_name_team_and_submitter(admin_client_, jobs):
    url = "/admin/scheduling/job/"
    assert "prune resnet" in page(admin_client_, url, q="resnet")
    assert "quantize bert" not in page(admin_client_, url, q="resnet")
    assert "quantize bert" in page(admin_client_, url, q="charlie")
    assert "prune resnet" in page(admin_client_, url, q="Team A")


def test_job_filters_narrow_the_list(admin_client_, jobs):
    url = "/admin/scheduling/job/"
    allocated = page(admin_client_, url, state__exact="allocated")
    assert "prune resnet" in allocated
    assert "quantize bert" not in allocated
    by_team = page(admin_client_, url, team__id__exact=str(jobs["bert"].team_id))
    assert "quantize bert" in by_team
    assert "prune resnet" not in by_team


def test_node_search_and_filters(admin_client_, node_a, node_b):
    url = "/admin/cluster/gpunode/"
    assert "a-node-1" in page(admin_client_, url, q="a1.example")
    assert "b-node-1" not in page(admin_client_, url, q="a1.example")
    assert "b-node-1" in page(admin_client_, url, rack__exact="r2")
    assert "a-node-1" not in page(admin_client_, url, rack__exact="r2")
    assert "a-node-1" in page(admin_client_, url, state__exact="active")


def test_gpu_search_and_team_search(admin_client_, node_a, node_b, team_a):
    assert "b-node-1" not in page(admin_client_, "/admin/cluster/gpu/", q="a-node-1")
    assert "Team B" not in page(admin_client_, "/admin/accounts/team/", q="team-a")


def test_event_search_and_filter(admin_client_, jobs):
    url = "/admin/scheduling/jobevent/"
    assert "placed on a-node-1" in page(admin_client_, url, q="placed")
    assert "placed on a-node-1" not in page(admin_client_, url, to_state__exact="queued")


def test_the_drain_action_drains_the_selected_nodes(admin_client_, node_a, node_b):
    response = admin_client_.post("/admin/cluster/gpunode/", {"action": "drain", "_selected_action": [node_a.pk]})
    assert response.status_code == 302
    node_a.refresh_from_db()
    node_b.refresh_from_db()
    assert (node_a.state, node_b.state) == ("draining", "active")


def test_job_events_cannot_be_added_changed_or_deleted_in_the_admin(admin_client_, jobs):
    event = JobEvent.objects.filter(job=jobs["resnet"]).last()
    assert event.message == "placed on a-node-1"
    url = "/admin/scheduling/jobevent/"
    assert admin_client_.get(f"{url}add/").status_code == 403
    assert admin_client_.get(f"{url}{event.pk}/delete/").status_code == 403
    assert admin_client_.post(f"{url}{event.pk}/change/", {"message": "rewritten"}).status_code == 403
    view = page(admin_client_, f"{url}{event.pk}/change/")
    assert 'name="_save"' not in view
    assert 'name="message"' not in view
    bulk = admin_client_.post(url, {"action": "delete_selected", "_selected_action": [event.pk], "post": "yes"})
    assert bulk.status_code in (200, 302)
    assert JobEvent.objects.get(pk=event.pk).message == "placed on a-node-1"


def test_staff_hold_and_release_queued_jobs_in_bulk_and_the_others_are_left_alone(admin_client_, jobs):
    url = "/admin/scheduling/job/"
    ids = [str(jobs["resnet"].pk), str(jobs["bert"].pk)]  # one allocated, one queued
    response = admin_client_.post(url, {"action": "hold_jobs", "_selected_action": ids}, follow=True)
    html = response.content.decode()
    assert "Held 1 job." in html
    assert f"#{jobs['resnet'].pk} (allocated)" in html
    bert = Job.objects.get(pk=jobs["bert"].pk)
    assert (bert.held, bert.held_by) == (True, "root")
    assert not Job.objects.get(pk=jobs["resnet"].pk).held
    admin_client_.post(url, {"action": "release_jobs", "_selected_action": [str(bert.pk)]})
    assert not Job.objects.get(pk=bert.pk).held
    assert list(JobEvent.objects.filter(job=bert, kind="note").values_list("message", flat=True)) == [
        "Held by root.", "Released by root."]
