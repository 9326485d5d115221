"""The job state machine, in one place.

    queued ──▶ allocated ──▶ running ──▶ succeeded | failed | cancelled
       ▲           │            │
       └── retry ──┴────────────┘          (a requeued attempt goes back to queued, attempt + 1)
    queued ──────────────────────────────▶ cancelled         (nothing to stop)
    allocated | running ──▶ cancelling ──▶ cancelled | failed
    allocated | running ──▶ preempting ──▶ queued (attempt + 1, resumes from its checkpoint)
                                       ──▶ succeeded | failed (it ended first) | cancelling
"""
from __future__ import annotations

from django.db import models


class JobState(models.TextChoices):
    QUEUED = "queued", "Queued"
    ALLOCATED = "allocated", "Allocated"
    RUNNING = "running", "Running"
    CANCELLING = "cancelling", "Cancelling"
    PREEMPTING = "preempting", "Preempting"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"


S = JobState
TRANSITIONS: dict[str, frozenset[str]] = {
    S.QUEUED: frozenset({S.ALLOCATED, S.CANCELLED, S.FAILED}),
    S.ALLOCATED: frozenset({S.RUNNING, S.QUEUED, S.CANCELLING, S.FAILED, S.PREEMPTING}),
    S.RUNNING: frozenset({S.SUCCEEDED, S.FAILED, S.QUEUED, S.CANCELLING, S.PREEMPTING}),
    S.CANCELLING: frozenset({S.CANCELLED, S.FAILED}),
    S.PREEMPTING: frozenset({S.QUEUED, S.SUCCEEDED, S.FAILED, S.CANCELLING}),
    S.SUCCEEDED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
}
TERMINAL: frozenset[str] = frozenset(s for s, nexts in TRANSITIONS.items() if not nexts)
# States in which the job holds (or is about to hold) GPUs.
LIVE: frozenset[str] = frozenset({S.ALLOCATED, S.RUNNING, S.CANCELLING, S.PREEMPTING})
# States in which the worker is told to stop the attempt.
STOPPING: frozenset[str] = frozenset({S.CANCELLING, S.PREEMPTING})


class IllegalTransition(Exception):
    """A state change the machine does not allow; the API answers 409."""

    def __init__(self, current: str, target: str):
        self.current, self.target = current, target
        super().__init__(f"{'An' if current[:1] in 'aeiou' else 'A'} {current} job cannot become {target}.")


def check_transition(current: str, target: str) -> None:
    if target not in TRANSITIONS.get(current, frozenset()):
        raise IllegalTransition(current, target)
