"""Live pages in a real browser, against a real ASGI server: daphne with the project's application and a
Redis channel layer (database 12), on the test database. Alice submits a job through the form and
watches it enter the queue, wait, start and report progress, without a reload; the server restarts
and the page's socket comes back by itself. A screenshot of the dashboard is kept in var/test-artifacts/.

The server is a second process, so the test database must be one that two processes can open:
PostgreSQL (DATABASE_URL, as in .ci/run); on the in-memory SQLite test database the test skips.
"""
from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from django.db import connection

from apps.cluster.models import GpuNode
from apps.scheduling import reports
from apps.scheduling.live import run_pass
from apps.scheduling.models import Job
from tests.conftest import COMPRESSION_JOB
from tests.net import free_port
from tests.threads import in_thread

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

ROOT = Path(__file__).resolve().parent.parent.parent
ARTIFACTS = ROOT / "var" / "test-artifacts"
REDIS_DB = 12


def redis_url() -> str:
    return os.environ.get("TEST_CHANNELS_REDIS_URL") or f"redis://127.0.0.1:6379/{REDIS_DB}"


def database_url() -> str:
    settings = connection.settings_dict
    if connection.vendor != "postgresql":
        pytest.skip("The live server is a second process and cannot open the in-memory SQLite test database; "
                    "run with DATABASE_URL=postgres://… (as .ci/run does).")
    user = settings.get("USER") or ""
    password = f":{settings['PASSWORD']}" if settings.get("PASSWORD") else ""
    auth = f"{user}{password}@" if user else ""
    return f"postgres://{auth}{settings.get('HOST') or '127.0.0.1'}:{settings.get('PORT') or 5432}/{settings['NAME']}"


class Daphne:
    """`daphne deepopt_web.asgi:application` in a process group of its own; stop() and start() again on the
    same port, as a deployment restarts it."""

    def __init__(self, env: dict[str, str], port: int, log: Path) -> None:
        self.env, self.port, self.log = env, port, log
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "daphne", "-v", "1", "-b", "127.0.0.1", "-p", str(self.port),
             "deepopt_web.asgi:application"],
            cwd=ROOT, env=self.env, stdout=self.log.open("a"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"daphne exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.1)
        raise RuntimeError("daphne did not listen within 30 s")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.fixture
def live_daphne(transactional_db, settings, tmp_path) -> Iterator[Daphne]:
    import redis

    url = redis_url()
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except (redis.RedisError, OSError) as exc:
        pytest.skip(f"Redis does not answer on {url} ({exc}); the live server's channel layer needs it.")
    # This process publishes too (the scheduling pass, the worker's reports): through the same Redis.
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
                                           "CONFIG": {"hosts": [url]}}}
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "deepopt_web.settings.test", "DATABASE_URL": database_url(),
           "TEST_CHANNELS_REDIS_URL": url, "DEEPOPT_SCHEDULER_TRIGGER": "off", "DEEPOPT_DISPATCH": "off",
           "PYTHONUNBUFFERED": "1"}
    server = Daphne(env, free_port(), tmp_path / "daphne.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def tabs(browser, live_daphne) -> Iterator[Callable]:
    context = browser.new_context(base_url=live_daphne.url, viewport={"width": 1360, "height": 900})

    def new_tab():
        tab = context.new_page()
        tab.set_default_timeout(15_000)
        return tab

    yield new_tab
    context.close()


def elsewhere(fn: Callable, *args, **kwargs):
    """Run fn in another thread, as a worker or the scheduler would (no event loop there: the app's
    publisher sends through its own thread), and return what it returned."""
    from apps.dashboard.events import flush_pending

    def cleanup() -> None:
        flush_pending()
        connection.close()

    return in_thread(lambda: fn(*args, **kwargs), timeout=30, cleanup=cleanup)


def live(tab) -> None:
    tab.wait_for_selector("#live-status[data-state=live]")


def sign_in_at(tab, path: str, username: str) -> None:
    """Open `path`, sign in through the login form it redirects to (the fixtures' password), wait for the
    page to come back and its socket to be live."""
    tab.goto(path)
    tab.fill("#id_username", username)
    tab.fill("#id_password", f"{username}-pass-123")
    tab.click("button:has-text('Sign in')")
    tab.wait_for_url(re.compile(re.escape(path) + "$"))
    live(tab)


def test_a_job_submitted_in_the_form_enters_the_queue_and_changes_state_live(tabs, alice, team_a, node_a,
                                                                            client_for, live_daphne):
    queue_tab = tabs()
    sign_in_at(queue_tab, "/queue/", "alice")
    assert "Nothing is waiting." in queue_tab.inner_text("[data-testid=queue-table]")
    # Set on this page only: still there at the end means the page was never reloaded.
    queue_tab.evaluate("window.__notReloaded = true")

    form_tab = tabs()
    form_tab.goto("/jobs/new/")
    form_tab.fill("#id_name", "live quantize")
    form_tab.select_option("#id_compression_model", "resnet50")
    form_tab.fill("#id_gpus", "1")
    form_tab.click("button:has-text('Submit job')")
    form_tab.wait_for_url(re.compile(r"/jobs/\d+/$"))
    job = Job.objects.get(name="live quantize")
    live(form_tab)
    notice = ".alert[data-notice~='while-queued']"
    assert form_tab.inner_text(notice) == f"Job #{job.pk} “live quantize” is in the queue."

    # The new job appears in the queue page, before any scheduling pass.
    row = queue_tab.wait_for_selector(f"[data-queue-row='{job.pk}']")
    assert "live quantize" in row.inner_text()
    assert "Waiting for the scheduler" in row.inner_text()

    # A second job that cannot fit next to the first: it stays queued with a position and a reason.
    api = client_for(alice)
    big = elsewhere(api.post, "/api/v1/jobs/", {**COMPRESSION_JOB, "name": "waits for 8", "team": team_a.pk,
                                                "resources": {"gpus": 8}}, format="json").json()["id"]
    queue_tab.wait_for_selector(f"[data-queue-row='{big}']")
    assert elsewhere(run_pass, with_etas=True).placed == [job.pk]
    queue_tab.wait_for_selector(f"[data-queue-row='{job.pk}']", state="detached")
    queue_tab.wait_for_function(
        f"document.querySelector(\"[data-queue-row='{big}'] [data-field=position]\").textContent.trim() === '1'")
    # Its ETA: when the 1-GPU job's 30-minute walltime is up, the node is free for the 8-GPU job.
    queue_tab.wait_for_function(
        f"!document.querySelector(\"[data-queue-row='{big}'] [data-field=eta]\").textContent.includes('unknown')")
    assert re.fullmatch(r"\d\d:\d\d \(in (29|30) min\)",
                        queue_tab.inner_text(f"[data-queue-row='{big}'] [data-field=eta]").strip())
    reason = Job.objects.select_related("queue_entry").get(pk=big).waiting_reason
    assert reason
    assert reason[:40] in queue_tab.inner_text(f"[data-queue-row='{big}'] [data-field=reason]")

    # The job page follows its job: allocated, then running with the worker's progress and log.
    form_tab.wait_for_function("document.querySelector('[data-testid=job-state]').innerText.trim() === 'allocated'")
    form_tab.wait_for_selector(notice, state="detached")   # "is in the queue" is no longer true
    elsewhere(reports.progress, GpuNode.objects.get(pk=node_a.pk), job.pk, 1, rank=0, run_id="run-1", seq=1,
              pid=4242, lines=[{"type": "progress", "stage": "quantize", "step": 3, "steps": 12, "loss": 0.5},
                               {"type": "log", "message": "layer 3 of 12 quantized to int8"}])
    form_tab.wait_for_function("document.querySelector('[data-testid=job-state]').innerText.trim() === 'running'")
    form_tab.wait_for_selector("text=layer 3 of 12 quantized to int8")
    assert form_tab.inner_text("[data-live-progress] [data-field=progress-text]") == "quantize · step 3 of 12 · 25 %"
    assert form_tab.get_attribute("[data-field=progress-bar]", "style") == "width: 25%;"
    # The parts of the page that events do not carry are fetched again: overview, GPUs held, history.
    form_tab.wait_for_function(
        "document.querySelector('[data-live-region=job-overview] .badge').innerText.trim() === 'running'")
    assert "a-node-1" in form_tab.inner_text("[data-live-region=job-allocations]")
    assert "Started on a-node-1" in form_tab.inner_text("[data-live-region=job-events]")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    form_tab.screenshot(path=str(ARTIFACTS / "job-live.png"), full_page=True)

    assert queue_tab.evaluate("window.__notReloaded") is True

    dashboard = tabs()
    dashboard.goto("/")
    live(dashboard)
    dashboard.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
    dashboard.close()

    # The server restarts: the page says so, reconnects by itself, and hears events again.
    live_daphne.stop()
    queue_tab.wait_for_selector("#live-status[data-state=reconnecting]")
    live_daphne.start()
    queue_tab.wait_for_selector("#live-status[data-state=live]", timeout=30_000)
    assert elsewhere(api.post, f"/api/v1/jobs/{big}/cancel/").status_code == 200
    queue_tab.wait_for_selector(f"[data-queue-row='{big}']", state="detached")
    assert "Nothing is waiting." in queue_tab.inner_text("[data-testid=queue-table]")
    assert queue_tab.evaluate("window.__notReloaded") is True


def test_a_member_removed_from_the_team_loses_its_queue_on_the_open_page(tabs, alice, bob, team_a, client_for):
    """No navigation: the membership change moves Bob's socket off team A and the page redraws its queue."""
    from apps.accounts.models import Membership

    response = elsewhere(client_for(alice).post, "/api/v1/jobs/",
                         {**COMPRESSION_JOB, "name": "team a only", "team": team_a.pk}, format="json")
    assert response.status_code == 201, response.content
    job = response.json()["id"]
    elsewhere(run_pass)  # no node: it stays queued, with a position and a reason
    tab = tabs()
    sign_in_at(tab, "/queue/", "bob")
    assert "team a only" in tab.inner_text(f"[data-queue-row='{job}']")
    tab.evaluate("window.__notReloaded = true")

    elsewhere(lambda: Membership.objects.filter(user=bob, team=team_a).delete())
    tab.wait_for_selector(f"[data-queue-row='{job}']", state="detached")
    assert "team a only" not in tab.inner_text("[data-testid=queue-table]")
    assert tab.evaluate("window.__notReloaded") is True
    assert tab.get_attribute("#live-status", "data-state") == "live"


def test_a_training_jobs_page_catches_up_with_a_start_it_missed_and_draws_its_loss_live(
        tabs, alice, team_a, node_a, client_for):
    """The job starts between the page's rendering and its socket's subscribing (the subscription's answer
    brings the page up to date); then each progress event adds a point to the loss chart, and the result's
    curve replaces the live one when the run ends."""
    response = elsewhere(client_for(alice).post, "/api/v1/jobs/", {
        "name": "live loss", "kind": "training", "team": team_a.pk, "resources": {"gpus": 2},
        "spec": {"model": "digits-mlp", "steps": 300}}, format="json")
    assert response.status_code == 201, response.content
    job = response.json()["id"]
    tab = tabs()
    sign_in_at(tab, "/queue/", "alice")
    # From here on the page's socket cannot open until the test lets it: the job page is rendered while
    # the job is queued, and the job is allocated and starts before the page hears anything.
    tab.add_init_script("""
        const Real = window.WebSocket;
        window.WebSocket = function (url) {
          if (!window.__socketsAllowed) throw new Error("held back by the test");
          return new Real(url);
        };
        window.WebSocket.OPEN = Real.OPEN;
    """)
    tab.goto(f"/jobs/{job}/")
    assert tab.inner_text("[data-testid=job-state]").strip() == "queued"
    assert tab.query_selector("[data-loss-chart]") is None  # queued: nothing to draw yet
    node = GpuNode.objects.get(pk=node_a.pk)
    assert elsewhere(run_pass).placed == [job]
    elsewhere(reports.progress, node, job, 1, rank=0, run_id="run-1", seq=1, pid=77,
              lines=[{"type": "step", "step": 1, "steps": 300, "loss": 2.3}])
    tab.evaluate("window.__socketsAllowed = true")
    live(tab)
    tab.wait_for_function("document.querySelector('[data-testid=job-state]').innerText.trim() === 'running'")
    tab.wait_for_selector("[data-loss-chart][data-points='1']")
    assert "step 1/300, loss 2.3" in tab.inner_text("[data-live-log]")

    for seq, (step, loss) in enumerate([(10, 1.2), (20, 0.7)], start=2):
        elsewhere(reports.progress, node, job, 1, rank=0, run_id="run-1", seq=seq, pid=77,
                  lines=[{"type": "step", "step": step, "steps": 300, "loss": loss}])
        tab.wait_for_selector(f"[data-loss-chart][data-points='{seq}']")
    assert tab.inner_text("[data-live-progress] [data-field=progress-text]") == "step 20 of 300 · 6.7 %"

    elsewhere(reports.result, node, job, 1, rank=0, run_id="run-1", status="succeeded", exit_code=0,
              result={"loss_curve": [[1, 2.3], [150, 0.3], [300, 0.05]], "eval_loss": 0.08, "final_loss": 0.05})
    tab.wait_for_function("document.querySelector('[data-testid=job-state]').innerText.trim() === 'succeeded'")
    tab.wait_for_selector("[data-loss-chart][data-source=result][data-points='3']")
    assert "held-out loss 0.0800 at the end" in tab.inner_text("[data-testid=training-curve]")


def test_the_dashboard_draws_the_forecast_and_redraws_it_and_the_autoscaler_live(tabs, alice, team_a, node_a,
                                                                                 client_for, live_daphne):
    """The seeded load history (make run's) with a Prophet forecast and its band on the dashboard; a new
    forecast redraws the chart and a scaling decision enters the autoscaler's table, without a reload."""
    from django.core.management import call_command
    from django.utils import timezone

    from apps.cluster.services import register_node, set_node_state
    from apps.forecasting.models import Series
    from apps.forecasting.series import ALLOCATED, CLUSTER_KEY
    from apps.forecasting.services import autoscale, forecast_series

    register_node(team=team_a, name="a-node-small", hostname="a2.example", rack="r1",
                  gpus=[{"index": i, "model": "NVIDIA H200", "memory_mb": 143_771} for i in range(4)])
    set_node_state(node_a, GpuNode.State.STANDBY)  # 4 GPUs active, 8 on standby
    call_command("seed_history", gpus=12, stdout=io.StringIO())
    series = Series.objects.get(key=CLUSTER_KEY.format(metric=ALLOCATED))
    earlier = forecast_series(series, now=timezone.now() - timedelta(hours=1))

    tab = tabs()
    sign_in_at(tab, "/", "alice")
    tab.evaluate("window.__notReloaded = true")
    chart = f".load-chart[data-series-id='{series.pk}']"
    plotted = ("(sel) => Object.fromEntries(document.querySelector(sel + ' [data-chart-plot]').data"
               ".map(t => [t.name, t.x.length]))")
    levels = ("(sel) => Object.fromEntries(document.querySelector(sel + ' [data-chart-plot]').data"
              ".filter(t => t.name.includes(' line')).map(t => [t.name, t.y]))")

    def origin_drawn() -> datetime:
        return datetime.fromisoformat(tab.get_attribute(chart, "data-forecast-origin").replace("Z", "+00:00"))

    tab.wait_for_selector(f"{chart}[data-forecast-origin]")
    assert origin_drawn() == earlier.origin
    assert tab.get_attribute(chart, "data-capacity") == "4"
    assert stat_feet(tab) == {"active": "1", "standby": "1", "unavailable": "8"}
    traces = tab.evaluate(plotted, chart)
    # The last 24 h observed (10-minute points), the forecast and both edges of its band, the capacity.
    assert traces["observed"] >= 100
    assert traces["forecast"] == traces["80% band"] == traces["upper"] == len(earlier.points)
    assert traces["active GPUs"] == 2
    # The autoscaler's lines at 80 % and 50 % of the 4 active GPUs.
    assert tab.evaluate(levels, chart) == {"scale-up line (80 %)": [3.2, 3.2], "scale-down line (50 %)": [2, 2]}

    # A new forecast (the beat's refresh, here called directly) redraws the chart in place.
    latest = elsewhere(forecast_series, series)
    assert latest.origin > earlier.origin
    tab.wait_for_function(f"document.querySelector(\"{chart}\").getAttribute('data-forecast-origin') "
                          f"!== '{tab.get_attribute(chart, 'data-forecast-origin')}'")
    assert origin_drawn() == latest.origin
    assert latest.method in tab.inner_text(f"{chart} [data-chart-meta]")
    # With it, how the forecasts did on the hour of targets that came in since the first one (each scored
    # by the forecast from 10 minutes, 1 hour and 6 hours before it).
    record = latest.track_record
    assert set(record) == {"10min", "1h", "6h"}
    assert record["1h"]["scored"] >= 5
    scores = tab.inner_text(f"{chart} [data-chart-record]")
    assert scores.startswith("How it did since ")
    assert f"1h ahead MAE {record['1h']['mae']:.1f}" in scores
    assert scores.index("10min ahead") < scores.index("1h ahead") < scores.index("6h ahead")

    # The forecast peak over the next 10 minutes (the seeded load is scaled to 12 GPUs) or, at worst, an
    # 8-GPU job that cannot run on the 4 active GPUs: the autoscaler brings a-node-1 back, and says why.
    response = elsewhere(client_for(alice).post, "/api/v1/jobs/",
                         {**COMPRESSION_JOB, "name": "needs 8", "team": team_a.pk, "resources": {"gpus": 8}},
                         format="json")
    assert response.status_code == 201, response.content
    # The new job is counted at once (no scheduling pass runs in this test).
    tab.wait_for_function("document.querySelector('[data-stat=queued]').textContent.trim() === '1'")
    assert tab.inner_text(f"[data-usage-team='{team_a.pk}'] [data-usage=queued_jobs]") == "1"
    decisions = elsewhere(autoscale)
    assert [(d.action, d.node_name) for d in decisions] == [("activate", "a-node-1")]
    row = tab.wait_for_selector("[data-decisions] tr:has-text('a-node-1')")
    assert "Bring back from standby" in row.inner_text()
    assert decisions[0].reason in row.inner_text()
    assert f"{decisions[0].forecast_peak:.1f}" in row.inner_text()
    # The node's return moves the capacity line and the numbers above, their feet included.
    tab.wait_for_selector(f"{chart}[data-capacity='12']")
    assert tab.evaluate(plotted, chart)["active GPUs"] == 2
    assert tab.evaluate(levels, chart) == {"scale-up line (80 %)": [9.6, 9.6], "scale-down line (50 %)": [6, 6]}
    tab.wait_for_function("document.querySelector('[data-stat=gpus-free]').textContent.trim() === '12'")
    assert stat_feet(tab) == {"active": "2"}
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    tab.screenshot(path=str(ARTIFACTS / "dashboard-forecast.png"), full_page=True)
    assert tab.evaluate("window.__notReloaded") is True


def stat_feet(tab) -> dict[str, str]:
    """The dashboard's visible node counts by state, and the idle GPUs on nodes that take no jobs."""
    return tab.evaluate("""() => {
        const out = {};
        document.querySelectorAll('[data-node-state-count]').forEach(el => {
            const count = el.querySelector('[data-count]').textContent;
            if (!el.hidden) out[el.getAttribute('data-node-state-count')] = count;
        });
        const idle = document.querySelector('[data-stat-unavailable]');
        if (idle && !idle.hidden) out.unavailable = idle.querySelector('[data-count]').textContent;
        return out;
    }""")


def test_the_node_grid_shows_each_gpus_utilization_and_state_live(tabs, alice, team_a, node_a, live_daphne):
    """A heartbeat's per-GPU readings fill the node grid's cells, and a drain changes the node's badge,
    on the open page."""
    from apps.cluster.agent import record_heartbeat
    from apps.cluster.services import set_node_state

    tab = tabs()
    sign_in_at(tab, "/nodes/", "alice")
    tab.evaluate("window.__notReloaded = true")
    row = f"[data-node-row='{node_a.pk}']"
    assert tab.get_attribute(f"{row} [data-gpu='3']", "style") in (None, "")
    elsewhere(record_heartbeat, GpuNode.objects.get(pk=node_a.pk), host={"cpu_percent": 10.0},
              gpus=[{"index": i, "utilization": 10.0 * i, "memory_used_mb": 1024 * i, "memory_total_mb": 143_771}
                    for i in range(8)])
    cell = f"document.querySelector(\"{row} [data-gpu='3']\")"
    tab.wait_for_function(f"{cell}.style.getPropertyValue('--util') === '30%'")
    assert tab.get_attribute(f"{row} [data-gpu='7']", "title") == "GPU 7: 70 %, 7 GB used"
    elsewhere(set_node_state, GpuNode.objects.get(pk=node_a.pk), GpuNode.State.DRAINING)
    tab.wait_for_function(f"document.querySelector(\"{row} [data-field=state]\").innerText.trim() === 'draining'")
    assert tab.evaluate("window.__notReloaded") is True
