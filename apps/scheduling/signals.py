"""Hooks other parts of DeepOpt listen to. They are sent after the transaction commits.

- `job_changed(job, event)`: a job was submitted or changed state; the live dashboard fans it out.
- `scheduling_requested(reason)`: something happened that may let a queued job start (a submit, a
  job end, a node change); the scheduler runs a pass.
"""
from django.dispatch import Signal

job_changed = Signal()
scheduling_requested = Signal()
