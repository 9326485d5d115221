"""The dashboard's load section and the compression result's per-layer chart, as the pages render them."""
from __future__ import annotations

import json
import re
from datetime import timedelta

import pytest
from django.utils import timezone

from apps.forecasting.models import Forecast, Series
from apps.forecasting.series import rollup_minute
from apps.scheduling.models import Job

pytestmark = pytest.mark.django_db


def embedded(page: bytes, element_id: str) -> object:
    pattern = rf'<script id="{re.escape(element_id)}" type="application/json">(.*?)</script>'
    match = re.search(pattern, page.decode(), re.S)
    assert match, f"no {element_id} data in the page"
    return json.loads(match.group(1))


def test_the_dashboard_charts_observed_load_forecast_and_capacity(bob, node_a, client):
    rollup_minute()
    rollup_minute(timezone.now() - timedelta(minutes=10))
    series = Series.objects.get(key="cluster:all:allocated_gpus")
    now = timezone.now()
    Forecast.objects.create(series=series, origin=now, step_s=300, method="prophet+residual",
                            points=[[(now + timedelta(minutes=5)).isoformat(), 2.0, 1.0, 3.0]])
    client.force_login(bob)
    page = client.get("/").content
    chart = embedded(page, series.key)
    assert chart["capacity"] == 8  # node_a's GPUs, all active
    assert len(chart["history"]["t"]) == 2
    assert chart["history"]["y"] == [0.0, 0.0]
    assert chart["forecast"]["yhat"] == [2.0]
    assert chart["forecast"]["lower"] == [1.0]
    assert chart["forecast"]["upper"] == [3.0]
    assert b"vendor/plotly.min.js" in page
    assert b'data-testid="scaling-decisions"' in page
    # The autoscaler's lines, as shares of that capacity (the policy's defaults); the queue chart has none.
    assert chart["autoscaler"] == {"scale_up_at": 0.8, "scale_down_below": 0.5}
    assert embedded(page, "cluster:all:queued_gpus")["autoscaler"] is None


def test_the_capacity_chart_drops_the_autoscalers_lines_while_it_is_off(bob, node_a, client):
    from apps.forecasting.models import AutoscalerPolicy

    rollup_minute()
    AutoscalerPolicy.objects.create(pk=1, scale_up_at=0.9, scale_down_below=0.3)
    client.force_login(bob)
    assert embedded(client.get("/").content, "cluster:all:allocated_gpus")["autoscaler"] == {
        "scale_up_at": 0.9, "scale_down_below": 0.3}
    AutoscalerPolicy.objects.filter(pk=1).update(enabled=False)
    assert embedded(client.get("/").content, "cluster:all:allocated_gpus")["autoscaler"] is None


def test_a_compression_result_shows_each_layers_precision_and_sensitivity(alice, job_of_alice, client):
    layers = [{"name": "encoder.0.attn.q", "format": "fp8_e4m3", "sensitivity": 0.001,
               "sensitivity_by_format": {"fp8_e4m3": 0.001, "int4_g64": 0.02}, "bytes": 4096, "kept": 1.0,
               "shape": [64, 64]},
              {"name": "encoder.0.mlp.fc1", "format": "int4_g64", "sensitivity": 0.004,
               "sensitivity_by_format": {"fp8_e4m3": 0.0005, "int4_g64": 0.004}, "bytes": 2048, "kept": 0.7,
               "shape": [128, 64]}]
    Job.objects.filter(pk=job_of_alice.pk).update(result={"quality_metric": "cosine", "layers": layers})
    client.force_login(alice)
    page = client.get(f"/jobs/{job_of_alice.pk}/").content
    assert embedded(page, "compression-layers") == layers
    assert b"encoder.0.mlp.fc1" in page
    assert b"int4_g64" in page


def test_a_compression_result_leads_with_before_and_after(alice, job_of_alice, client):
    result = {"quality_metric": "cosine", "model": "bert-base", "wall_s": 29.3,
              "baseline": {"quality": 1.0, "weight_bytes": 435_566_592, "params": 109_482_240, "latency_ms": 7.32},
              "compressed": {"quality": 0.99376, "executed_quality": 0.99374, "weight_bytes": 61_668_672,
                             "params": 109_482_240, "latency_ms": 9.16},
              "layers": [{"name": "encoder.0.attn.q", "format": "int4_g64", "sensitivity": 0.001,
                          "sensitivity_by_format": {}, "bytes": 1, "kept": 1.0, "shape": [4, 4]}]}
    Job.objects.filter(pk=job_of_alice.pk).update(result=result)
    client.force_login(alice)
    html = client.get(f"/jobs/{job_of_alice.pk}/").content.decode()
    table = html.split('data-testid="compression-summary"')[1].split("</table>")[0]
    rows = re.findall(r"<tr><td>(.*?)</td><td class=\"num\">(.*?)</td><td class=\"num\">(.*?)</td>"
                      r"<td class=\"num\">(.*?)</td></tr>", table)
    assert rows == [
        ("Quality", "1.0000", "0.9938", "-0.0062"),
        ("Quality as executed", "1.0000", "0.9937", "-0.0063"),
        ("Weights", "435.6 MB", "61.7 MB", "7.06x smaller"),
        ("Parameters", "109,482,240", "109,482,240", "same"),
        ("Latency (ms)", "7.32", "9.16", "1.25x slower"),
    ]
    # The flat list below keeps the rest of the result, without the rows shown above or the per-layer list.
    flat = html.split('data-testid="compression-summary"')[1].split("</dl>")[0]
    assert "<dt>wall_s</dt>" in flat
    assert "<dt>baseline.quality</dt>" not in flat
    assert "<dt>layers</dt>" not in flat


def test_small_weights_read_in_kilobytes_not_as_zero_megabytes():
    from apps.dashboard.templatetags.deepopt import compression_summary

    rows = compression_summary({"baseline": {"weight_bytes": 559_720}, "compressed": {"weight_bytes": 42_326}})
    assert rows == [("Weights", "559.7 kB", "42.3 kB", "13.22x smaller")]
    big_and_tiny = {"baseline": {"weight_bytes": 2_210_000_000}, "compressed": {"weight_bytes": 512}}
    assert compression_summary(big_and_tiny)[0][1:3] == ("2.2 GB", "512 B")


def test_a_static_fp8_runs_input_scales_are_one_row_not_one_per_layer():
    from apps.dashboard.templatetags.deepopt import result_items

    result = {"quantization": {"fp8_inputs": {"mode": "static", "input_scales": {f"layers.{i}.qkv": 0.01 * (i + 1)
                                                                                 for i in range(12)}}},
              "wall_s": 3.0}
    rows = dict(result_items(result, "compression"))
    assert rows["quantization.fp8_inputs.mode"] == "static"
    assert rows["quantization.fp8_inputs.input_scales"] == "12 layers (in the artifact's manifest.json)"
    assert not [name for name in rows if ".input_scales." in name]
    assert rows["wall_s"] == 3.0


def test_a_training_job_charts_its_loss_from_the_progress_lines_then_from_its_result(alice, team_a, node_a, client):
    from apps.scheduling.models import JobEvent

    job = Job.objects.create(team=team_a, submitter=alice, name="train", kind=Job.Kind.TRAINING, gpus=2, nodes=1,
                             spec={"model": "digits-mlp", "steps": 300}, state=Job.State.RUNNING, attempt=2)
    lines = [(1, {"type": "step", "step": 1, "loss": 2.3}),  # an earlier attempt: not on the chart
             (2, {"type": "spawned", "pid": 7}),  # no step or loss
             (2, {"type": "step", "step": 10, "loss": 1.5}),
             (2, {"type": "step", "step": 20, "loss": 0.9, "lr": 0.001})]
    for attempt, data in lines:
        JobEvent.objects.create(job=job, kind=JobEvent.Kind.PROGRESS, attempt=attempt, data=data, message="-")
    client.force_login(alice)
    page = client.get(f"/jobs/{job.pk}/").content
    assert embedded(page, "training-curve") == {"job": job.pk, "steps": 300, "source": "log",
                                                 "points": [[10, 1.5], [20, 0.9]], "eval_loss": None}
    assert b"vendor/plotly.min.js" in page

    # Once the run has reported, the chart is the result's curve over the whole run, and the flat
    # list leaves the curve out.
    Job.objects.filter(pk=job.pk).update(state=Job.State.SUCCEEDED, result={
        "loss_curve": [[1, 2.3], [150, 0.4], [300, "bad"], [300, 0.1]], "eval_loss": 0.25, "final_loss": 0.1})
    page = client.get(f"/jobs/{job.pk}/").content
    assert embedded(page, "training-curve") == {"job": job.pk, "steps": 300, "source": "result",
                                                 "points": [[1, 2.3], [150, 0.4], [300, 0.1]], "eval_loss": 0.25}
    assert b"held-out loss 0.2500 at the end" in page
    assert b"<dt>final_loss</dt>" in page
    assert b"<dt>loss_curve</dt>" not in page


def test_no_loss_chart_for_a_queued_training_job_or_a_compression_job(alice, team_a, job_of_alice, client):
    queued = Job.objects.create(team=team_a, submitter=alice, name="train", kind=Job.Kind.TRAINING, gpus=1,
                                nodes=1, spec={"model": "digits-mlp", "steps": 10})
    client.force_login(alice)
    for job in (queued, job_of_alice):
        page = client.get(f"/jobs/{job.pk}/").content
        assert b'id="training-curve"' not in page
        assert b'data-testid="training-curve"' not in page


def test_a_team_page_charts_its_own_load_and_no_other_teams(alice, bob, team_a, team_b, node_a, node_b, client):
    rollup_minute()
    rollup_minute(timezone.now() - timedelta(minutes=10))
    own = Series.objects.get(key=f"team:{team_a.pk}:allocated_gpus")
    other = Series.objects.get(key=f"team:{team_b.pk}:allocated_gpus")
    client.force_login(alice)
    page = client.get(f"/teams/{team_a.pk}/").content
    assert embedded(page, own.key)["history"]["y"] == [0.0, 0.0]
    assert embedded(page, f"team:{team_a.pk}:queued_gpus")["label"].startswith("Team ")
    assert other.key.encode() not in page
    assert b"vendor/plotly.min.js" in page
    # A team with no points yet has no chart section and loads no plotly.
    from apps.forecasting.models import SeriesPoint

    SeriesPoint.objects.filter(series__team=team_a).delete()
    page = client.get(f"/teams/{team_a.pk}/").content
    assert b'data-testid="team-load"' not in page
    assert b"vendor/plotly.min.js" not in page
