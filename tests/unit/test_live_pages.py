"""What the pages render first, so that live events carry on from it: the latest heartbeat's GPU readings,
a job's progress and log so far, the data attributes live.js finds rows by."""
from __future__ import annotations

import pytest

from apps.cluster.agent import record_heartbeat
from apps.scheduling import reports
from apps.scheduling.live import run_pass
from tests.conftest import COMPRESSION_JOB

pytestmark = pytest.mark.django_db


def test_node_pages_show_each_gpus_latest_utilization(alice, node_a, client):
    record_heartbeat(node_a, host=None, gpus=[{"index": 0, "utilization": 87.0, "memory_used_mb": 9216,
                                                "memory_total_mb": 143771, "temperature_c": 61.0, "power_w": 412.0}])
    client.force_login(alice)
    detail = client.get(f"/nodes/{node_a.pk}/").content.decode()
    assert '<td class="num" data-field="utilization">87 %</td>' in detail
    assert '<td class="num" data-field="power_w">412 W</td>' in detail
    listing = client.get("/nodes/").content.decode()
    assert f'data-node-row="{node_a.pk}"' in listing
    assert 'data-gpu="0" style="--util: 87%"' in listing
    assert 'data-gpu="1">' in listing  # no reading for GPU 1: no fill


def test_the_job_page_shows_progress_and_log_so_far(alice, team_a, node_a, client, client_for):
    job_id = client_for(alice).post("/api/v1/jobs/", {**COMPRESSION_JOB, "team": team_a.pk}, format="json").json()["id"]
    client.force_login(alice)
    assert 'data-live-progress hidden' in client.get(f"/jobs/{job_id}/").content.decode()
    run_pass()
    reports.progress(node_a, job_id, 1, rank=0, run_id="r", seq=1, lines=[
        {"type": "progress", "stage": "prune", "step": 5, "steps": 20},
        {"type": "log", "message": "pruned block 5 <of> 20"},
    ])
    page = client.get(f"/jobs/{job_id}/").content.decode()
    assert f'data-live-job="{job_id}"' in page
    assert "prune · step 5 of 20 · 25 %" in page
    assert 'style="width: 25%"' in page
    assert "log, pruned block 5 &lt;of&gt; 20\n" in page


def test_the_job_pages_timeline_keeps_to_state_changes_and_counts_the_progress_lines(
        alice, team_a, node_a, client, client_for):
    """Progress lines live in the Progress card's log; a long job writes thousands of them, which the
    Events timeline only counts."""
    job_id = client_for(alice).post("/api/v1/jobs/", {**COMPRESSION_JOB, "team": team_a.pk}, format="json").json()["id"]
    run_pass()
    reports.progress(node_a, job_id, 1, rank=0, run_id="r", seq=1, lines=[
        {"type": "progress", "stage": "sensitivity", "pct": pct} for pct in range(0, 100, 4)])
    client.force_login(alice)
    page = client.get(f"/jobs/{job_id}/").content.decode()
    events = page[page.index('data-live-region="job-events"'):]
    assert "25 progress lines in the log above" in events
    assert "sensitivity, " not in events  # not in the timeline...
    assert "sensitivity, 96%" in page  # ...but in the log
    # The state changes stay: queued, allocated, and running (the first progress report starts the job).
    assert events.count("timeline-item") == 3
    assert "running" in events
