"""The live autoscaler: it acts on the latest cluster forecast, records each decision with the forecast that
caused it, never drains a busy node, can be switched off, and posts decisions to a webhook."""
from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from apps.cluster.models import GpuNode
from apps.cluster.services import set_node_state
from apps.forecasting.models import AutoscalerPolicy, Forecast, ScalingDecision, Series
from apps.forecasting.services import autoscale, post_webhook
from apps.scheduling.live import run_pass
from tests.unit.test_live_scheduler import submit

pytestmark = pytest.mark.django_db

NOW = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)


def forecast(peak: float, origin: datetime = NOW) -> Forecast:
    series, _ = Series.objects.get_or_create(key="cluster:all:allocated_gpus",
                                             defaults={"scope": "cluster", "metric": "allocated_gpus"})
    points = [[(origin + timedelta(minutes=5 * k)).isoformat(), peak if k == 2 else peak / 2, 0.0, peak + 1]
              for k in range(1, 25)]
    return Forecast.objects.create(series=series, origin=origin, step_s=300, method="test", points=points)


def state(node: GpuNode) -> str:
    node.refresh_from_db()
    return node.state


def test_a_forecast_over_80_percent_brings_standby_nodes_back(node_a, node_b):
    set_node_state(node_b, GpuNode.State.STANDBY)
    cause = forecast(peak=7.0)  # active: node_a's 8 GPUs; 7 > 6.4
    [decision] = autoscale(NOW)
    assert decision.action == "activate"
    assert decision.node_name == node_b.name
    assert decision.forecast == cause
    assert decision.forecast_peak == 7.0
    assert decision.active_capacity == 8
    assert "80%" in decision.reason
    assert state(node_b) == GpuNode.State.ACTIVE


def test_a_queued_job_larger_than_the_active_nodes_brings_nodes_back_whatever_the_forecast(
        alice, team_a, node_a, node_b, client_for):
    set_node_state(node_a, GpuNode.State.STANDBY)  # 4 GPUs (node_b) stay active
    # Fits only node_a: it allocates nothing, so no forecast of allocated GPUs would ever grow.
    submit(client_for(alice), team_a, 8)
    forecast(peak=0.0)
    [decision] = autoscale(NOW)
    assert decision.action == "activate"
    assert decision.node_name == node_a.name
    assert "8 GPUs" in decision.reason


def test_it_drains_an_idle_node_only_after_the_forecast_stayed_low(node_a, node_b):
    forecast(peak=1.0)
    assert autoscale(NOW) == []  # low since now: hysteresis
    assert AutoscalerPolicy.current().low_since == NOW
    forecast(peak=1.0, origin=NOW + timedelta(minutes=31))
    [decision] = autoscale(NOW + timedelta(minutes=31))
    assert decision.action == "standby"
    assert decision.node_name == node_a.name  # the largest idle node whose absence keeps the peak low
    assert state(node_a) == GpuNode.State.STANDBY
    # Cooldown: the next low forecast does not take the last node, and min_active_nodes=1 forbids it anyway.
    forecast(peak=0.5, origin=NOW + timedelta(minutes=120))
    assert autoscale(NOW + timedelta(minutes=120)) == []
    assert state(node_b) == GpuNode.State.ACTIVE


def test_a_node_with_running_jobs_is_never_drained(alice, team_a, node_a, node_b, client_for):
    submit(client_for(alice), team_a, 8)  # fills node_a
    run_pass()
    assert node_a.allocations.filter(released_at__isnull=True).count() == 8
    policy = AutoscalerPolicy.current()
    policy.below_for_minutes = 0
    policy.cooldown_minutes = 0
    policy.min_active_nodes = 0
    policy.save()
    forecast(peak=0.0)
    decisions = autoscale(NOW)
    assert [d.node_name for d in decisions] == [node_b.name]
    assert state(node_a) == GpuNode.State.ACTIVE


def test_switched_off_or_without_a_fresh_forecast_it_does_nothing(node_a, node_b):
    set_node_state(node_b, GpuNode.State.STANDBY)
    forecast(peak=8.0, origin=NOW - timedelta(hours=1))
    assert autoscale(NOW) == []  # an hour-old forecast is not acted on
    forecast(peak=8.0)
    policy = AutoscalerPolicy.current()
    policy.enabled = False
    policy.save()
    assert autoscale(NOW) == []
    assert state(node_b) == GpuNode.State.STANDBY
    assert not ScalingDecision.objects.exists()


class _Hook(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Hook.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args) -> None:  # noqa: ANN002
        pass


def test_a_decision_is_posted_to_the_webhook_and_its_status_recorded(node_a, node_b):
    server = HTTPServer(("127.0.0.1", 0), _Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        set_node_state(node_b, GpuNode.State.STANDBY)
        forecast(peak=7.0)
        [decision] = autoscale(NOW)
        url = f"http://127.0.0.1:{server.server_port}/scale"
        assert post_webhook(decision, url) == "HTTP 204"
        assert _Hook.received[-1]["event"] == "scaling.decision"
        assert _Hook.received[-1]["action"] == "activate"
        assert _Hook.received[-1]["node"] == node_b.name
        decision.refresh_from_db()
        assert decision.webhook_status == "HTTP 204"
    finally:
        server.shutdown()
    # A provisioner that is down is recorded, not raised.
    assert post_webhook(decision, url, timeout=1).startswith("error: ")


def test_the_forecasts_page_and_the_autoscaler_switch(alice, dana, node_a, client):
    forecast(peak=3.0)
    client.force_login(alice)
    page = client.get("/forecasts/")
    assert page.status_code == 200
    assert b"cluster:all:allocated_gpus" in page.content
    assert b"vendor/plotly.min.js" in page.content
    assert client.post("/forecasts/autoscaler/", {"enabled": "off"}).status_code == 403
    assert AutoscalerPolicy.current().enabled
    client.force_login(dana)
    assert client.post("/forecasts/autoscaler/", {"enabled": "off"}).status_code == 302
    assert not AutoscalerPolicy.current().enabled
    assert client.get("/static/vendor/plotly.min.js").status_code == 200
