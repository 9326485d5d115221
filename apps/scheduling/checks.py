"""Django system checks: a bad scheduler setting stops `manage.py` at start with one clear message,
not every scheduling pass later."""
from __future__ import annotations

from django.core.checks import Error


def check_scheduler_settings(app_configs=None, **kwargs) -> list[Error]:
    from .live import policy_config

    try:
        policy_config()
    except (TypeError, ValueError) as exc:
        return [Error(f"DEEPOPT_SCHEDULER: {exc}", hint="see docs/scheduler.md, 'Defaults, and why'",
                      id="scheduling.E001")]
    return []
