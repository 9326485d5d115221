"""Team webhooks: each job that ends (succeeded, failed, cancelled) is POSTed as JSON to its team's
`notify_url`, as Slurm mails on --mail-type=END. Sent by a Celery task after the commit; up to three tries
(1 s and 4 s apart) on a connection error or a 5xx; the outcome is the job's last event ("Webhook: HTTP 204.").
"""
from __future__ import annotations

import logging
import time

from apps.accounts.models import Team

from .models import Job, JobEvent
from .states import TERMINAL

log = logging.getLogger(__name__)
TRIES = 3
BACKOFF_S = (1.0, 4.0)
TIMEOUT_S = 5.0


def on_job_changed(sender, job: Job | None = None, event: JobEvent | None = None, **kwargs) -> None:  # noqa: ANN001
    """Listener of `job_changed` (after the commit): a job reached a terminal state and its team has a webhook."""
    if job is None or event is None or event.to_state not in TERMINAL:
        return
    if not Team.objects.filter(pk=job.team_id).exclude(notify_url="").exists():
        return
    from .tasks import post_job_webhook

    try:
        post_job_webhook.delay(job.pk)
    except Exception:  # noqa: BLE001 - runs after the commit; a broker outage must not fail the caller's request
        log.exception("Could not queue the webhook of job %s", job.pk)


def payload(job: Job) -> dict:
    from django.conf import settings

    when = lambda t: t.isoformat() if t else None  # noqa: E731
    base = getattr(settings, "DEEPOPT_PUBLIC_URL", "")
    return {
        "event": "job.finished",
        "job": {
            "id": job.pk, "name": job.name, "team": job.team_id, "team_name": job.team.name, "kind": job.kind,
            "state": job.state, "submitter": job.submitter.get_username(), "attempt": job.attempt,
            "gpus": job.gpus, "submitted_at": when(job.submitted_at), "started_at": when(job.started_at),
            "finished_at": when(job.finished_at), "error": job.error.splitlines()[0][:500] if job.error else "",
            "path": f"/jobs/{job.pk}/", "api": f"/api/v1/jobs/{job.pk}/",
            "url": f"{base}/jobs/{job.pk}/" if base else None,  # DEEPOPT_PUBLIC_URL + path, when it is set
        },
    }


def post(job_id: int, sleep=time.sleep) -> str:  # noqa: ANN001
    """POST the finished job to its team's webhook; returns the outcome, also written as the job's event."""
    import requests

    job = Job.objects.select_related("team", "submitter").filter(pk=job_id).first()
    if job is None or job.state not in TERMINAL or not job.team.notify_url:
        return "skipped"
    body = payload(job)
    status = ""
    for attempt in range(TRIES):
        try:
            response = requests.post(job.team.notify_url, json=body, timeout=TIMEOUT_S,
                                     headers={"User-Agent": "DeepOpt-webhook"})
            status = f"HTTP {response.status_code}"
            if response.status_code < 500:
                break
        except requests.RequestException as exc:
            status = f"error: {type(exc).__name__}"
        if attempt + 1 < TRIES:
            sleep(BACKOFF_S[attempt])
    tries = f" after {attempt + 1} tries" if attempt else ""
    JobEvent.objects.create(job=job, kind=JobEvent.Kind.NOTE, attempt=job.attempt,
                            message=f"Webhook: {status}{tries}.", data={"webhook": status})
    return status
