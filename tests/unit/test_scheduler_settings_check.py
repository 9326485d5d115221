"""A bad DEEPOPT_SCHEDULER setting is reported by Django's system checks, with what is wrong."""
from __future__ import annotations

from apps.scheduling.checks import check_scheduler_settings


def test_the_default_scheduler_settings_pass_the_check():
    assert check_scheduler_settings() == []


def test_an_unknown_served_order_fails_the_check_with_what_is_wrong(settings):
    settings.DEEPOPT_SCHEDULER = {**settings.DEEPOPT_SCHEDULER, "served_order": "oldest"}
    errors = check_scheduler_settings()
    assert [e.id for e in errors] == ["scheduling.E001"]
    assert "served_order must be one of slowdown, wfq, not 'oldest'" in errors[0].msg


def test_an_unknown_knob_fails_the_check(settings):
    settings.DEEPOPT_SCHEDULER = {"no_such_knob": 1}
    errors = check_scheduler_settings()
    assert [e.id for e in errors] == ["scheduling.E001"]
    assert "no_such_knob" in errors[0].msg
