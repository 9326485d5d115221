"""Runner output as the agent API can take and PostgreSQL can store it (standard library only: the worker
uses it on what a runner prints, the web app on what a worker reports)."""
from __future__ import annotations

import math


def json_safe(value):  # noqa: ANN001, ANN201
    """Strict JSON has no NaN or infinity (a diverged loss prints `NaN`), which become null, and
    PostgreSQL's text and jsonb hold no NUL character, which becomes U+FFFD. Without this a report
    holding one is refused, and a final result never arrives."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {json_safe(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value
