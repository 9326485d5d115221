"""A user's whole path through the pages in a real browser: sign in, submit (with a mistake first),
see the job queued, cancel it."""
from __future__ import annotations

import re

import pytest

from apps.scheduling.models import Job

pytestmark = pytest.mark.browser


def test_a_user_signs_in_submits_a_job_after_fixing_a_field_and_cancels_it(page, alice, team_a, node_a):
    page.goto("/jobs/")
    assert "/login/" in page.url
    page.fill("#id_username", "alice")
    page.fill("#id_password", "alice-pass-123")
    page.click("button:has-text('Sign in')")
    page.wait_for_url(re.compile(r"/jobs/$"))

    page.click("nav.mainnav >> text=Submit")
    page.wait_for_url(re.compile(r"/jobs/new/$"))
    # Only the chosen kind's settings show; switching kind swaps them.
    assert page.is_visible("[data-kind=compression]")
    assert page.is_hidden("[data-kind=training]")
    page.click("text=Distributed training with HCOF")
    assert page.is_visible("[data-kind=training]")
    page.click("text=Mixed-precision quantization")
    assert page.is_hidden("[data-kind=training]")

    page.fill("#id_name", "browser quantize")
    page.select_option("#id_compression_model", "resnet50")
    page.fill("#id_gpus", "0")
    page.click("button:has-text('Submit job')")
    page.wait_for_selector("#err_gpus")
    assert "greater than or equal to 1" in page.inner_text("#err_gpus")
    assert page.input_value("#id_name") == "browser quantize"
    assert page.input_value("#id_compression_model") == "resnet50"
    assert not Job.objects.exists()

    page.fill("#id_gpus", "2")
    page.click("button:has-text('Submit job')")
    page.wait_for_url(re.compile(r"/jobs/\d+/$"))
    job = Job.objects.get()
    assert page.url.endswith(f"/jobs/{job.pk}/")
    assert page.inner_text("[data-testid=job-state]").strip() == "queued"
    assert "is in the queue" in page.inner_text(".messages")
    assert (job.gpus, job.spec["model"]) == (2, "resnet50")

    page.once("dialog", lambda dialog: dialog.accept())
    page.click("button:has-text('Cancel job')")
    page.wait_for_selector("text=was cancelled")
    assert page.inner_text("[data-testid=job-state]").strip() == "cancelled"
    assert page.locator("button:has-text('Cancel job')").count() == 0
    job.refresh_from_db()
    assert job.state == "cancelled"
