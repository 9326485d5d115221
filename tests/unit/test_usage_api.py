"""`GET /api/v1/usage/`: each visible team against its quotas (the figures of the team pages)."""
from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from apps.cluster.models import Gpu
from apps.scheduling.models import Allocation, Job
from apps.scheduling.services import submit_job
from apps.scheduling.usage import month_start

pytestmark = pytest.mark.django_db


def test_usage_counts_gpus_held_and_this_months_gpu_hours_for_your_teams_only(
        alice, charlie, dana, team_a, team_b, node_a, client_for):
    running = submit_job(submitter=alice, team=team_a, name="held", kind="compression", gpus=2,
                         spec={"model": "minilm-l6"})
    queued = submit_job(submitter=alice, team=team_a, name="waits", kind="compression", gpus=1,
                        spec={"model": "minilm-l6"})
    done = submit_job(submitter=alice, team=team_a, name="done", kind="compression", gpus=1,
                      spec={"model": "minilm-l6"})
    gpus = list(Gpu.objects.filter(node=node_a).order_by("index"))
    for gpu in gpus[:2]:
        Allocation.objects.create(job=running, attempt=1, gpu=gpu, node=node_a)
    Job.objects.filter(pk=running.pk).update(state="running")
    # Three GPU-hours released inside this month, and one allocation that ended before it began (not counted).
    now = timezone.now()
    start = month_start(now)
    inside = Allocation.objects.create(job=done, attempt=1, gpu=gpus[2], node=node_a)
    Allocation.objects.filter(pk=inside.pk).update(created_at=now - timedelta(hours=3), released_at=now)
    before = Allocation.objects.create(job=done, attempt=1, gpu=gpus[3], node=node_a)
    Allocation.objects.filter(pk=before.pk).update(created_at=start - timedelta(days=2),
                                                   released_at=start - timedelta(days=1))
    assert queued.state == "queued"

    body = client_for(alice).get("/api/v1/usage/").json()
    [row] = body["results"]
    assert row["team"] == team_a.pk
    assert row["gpus_in_use"] == 2
    assert row["max_gpus"] == team_a.max_gpus
    # The two running GPUs have held for a moment; the released one for 3 hours, if the month is that old.
    expected = min(3.0, (now - start).total_seconds() / 3600)
    assert expected - 0.02 <= row["gpu_hours_this_month"] <= expected + 0.05
    assert row["gpu_hours_per_month"] == team_a.gpu_hours_per_month
    assert (row["queued_jobs"], row["running_jobs"]) == (2, 1)  # "waits" and "done" are still queued rows

    [other] = client_for(charlie).get("/api/v1/usage/").json()["results"]
    assert (other["team"], other["gpus_in_use"], other["gpu_hours_this_month"]) == (team_b.pk, 0, 0.0)
    assert {r["team"] for r in client_for(dana).get("/api/v1/usage/").json()["results"]} == {team_a.pk, team_b.pk}
    assert client_for(None).get("/api/v1/usage/").status_code == 401
