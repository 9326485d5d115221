"""Team webhooks: a job that ends is POSTed to its team's `notify_url` (Slurm's --mail-type=END)."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from apps.scheduling import notify
from apps.scheduling.models import JobEvent
from apps.scheduling.services import cancel_job, submit_job

pytestmark = pytest.mark.django_db


class _Hook(BaseHTTPRequestHandler):
    received: list = []
    answers: list = []  # status codes to give, in order (then 204)

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Hook.received.append((self.path, json.loads(body), self.headers.get("User-Agent")))
        self.send_response(_Hook.answers.pop(0) if _Hook.answers else 204)
        self.end_headers()

    def log_message(self, *args) -> None:  # noqa: ANN002
        pass


@pytest.fixture
def hook():
    _Hook.received, _Hook.answers = [], []
    server = HTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_staff_set_the_webhook_leads_see_it_and_members_do_not(alice, bob, dana, team_a, client_for):
    url = f"/api/v1/teams/{team_a.pk}/"
    assert client_for(alice).patch(url, {"notify_url": "https://hooks.example/x"}, format="json").status_code == 403
    bad = client_for(dana).patch(url, {"notify_url": "ftp://hooks.example/x"}, format="json")
    assert bad.status_code == 400
    assert "notify_url" in bad.json()
    ok = client_for(dana).patch(url, {"notify_url": "https://hooks.example/T0K3N"}, format="json")
    assert ok.status_code == 200, ok.content
    assert client_for(alice).get(url).json()["notify_url"] == "https://hooks.example/T0K3N"  # a lead
    assert "notify_url" not in client_for(bob).get(url).json()  # a member: the URL may carry a token
    assert "notify_url" not in client_for(bob).get("/api/v1/teams/").json()["results"][0]


def test_a_finished_job_is_posted_to_its_teams_webhook_once_and_the_outcome_is_its_last_event(
        alice, team_a, hook, settings, django_capture_on_commit_callbacks):
    settings.CELERY_TASK_ALWAYS_EAGER = True
    team_a.notify_url = f"{hook}/deepopt"
    team_a.save()
    job = submit_job(submitter=alice, team=team_a, name="to be cancelled", kind="compression",
                     spec={"model": "minilm-l6"})
    assert _Hook.received == []  # entering the queue is not an end
    with django_capture_on_commit_callbacks(execute=True):
        cancel_job(job, actor=alice)
    [(path, body, agent)] = _Hook.received
    assert path == "/deepopt"
    assert agent == "DeepOpt-webhook"
    assert body["event"] == "job.finished"
    assert {k: body["job"][k] for k in ("id", "name", "team", "state", "submitter", "path")} == {
        "id": job.pk, "name": "to be cancelled", "team": team_a.pk, "state": "cancelled", "submitter": "alice",
        "path": f"/jobs/{job.pk}/"}
    assert JobEvent.objects.filter(job=job).last().message == "Webhook: HTTP 204."
    assert body["job"]["url"] is None  # no DEEPOPT_PUBLIC_URL: the path only
    settings.DEEPOPT_PUBLIC_URL = "https://deepopt.example.org"
    assert notify.payload(job)["job"]["url"] == f"https://deepopt.example.org/jobs/{job.pk}/"


def test_a_failing_webhook_is_tried_three_times_and_a_dead_one_is_recorded_not_raised(alice, team_a, hook):
    job = submit_job(submitter=alice, team=team_a, name="j", kind="compression", spec={"model": "minilm-l6"})
    cancel_job(job, actor=alice)
    team_a.notify_url = hook
    team_a.save()
    waits = []
    _Hook.answers = [503, 502]
    assert notify.post(job.pk, sleep=waits.append) == "HTTP 204"
    assert len(_Hook.received) == 3
    assert waits == [1.0, 4.0]
    assert JobEvent.objects.filter(job=job).last().message == "Webhook: HTTP 204 after 3 tries."
    team_a.notify_url = "http://127.0.0.1:9/"  # nothing listens there
    team_a.save()
    assert notify.post(job.pk, sleep=lambda s: None) == "error: ConnectionError"
    assert JobEvent.objects.filter(job=job).last().message == "Webhook: error: ConnectionError after 3 tries."
    # A 4xx is the receiver's answer, not a failure to retry.
    team_a.notify_url = hook
    team_a.save()
    _Hook.received, _Hook.answers = [], [404]
    assert notify.post(job.pk, sleep=lambda s: None) == "HTTP 404"
    assert len(_Hook.received) == 1


def test_no_webhook_no_post(alice, team_a, hook, settings, django_capture_on_commit_callbacks):
    settings.CELERY_TASK_ALWAYS_EAGER = True
    job = submit_job(submitter=alice, team=team_a, name="j", kind="compression", spec={"model": "minilm-l6"})
    with django_capture_on_commit_callbacks(execute=True):
        cancel_job(job, actor=alice)
    assert _Hook.received == []
    assert not JobEvent.objects.filter(job=job, message__startswith="Webhook").exists()


def test_both_webhook_tasks_can_be_queued(settings):
    """A task whose hard time limit is under the app-wide soft limit is refused by apply_async: both webhook
    tasks set their own soft limit, so they queue (run here eagerly, on objects that do not exist)."""
    from apps.forecasting.tasks import post_scaling_webhook
    from apps.scheduling.tasks import post_job_webhook

    settings.CELERY_TASK_ALWAYS_EAGER = True
    assert post_job_webhook.delay(10**9).get() == "skipped"
    assert post_scaling_webhook.delay(10**9).get() == "skipped"
