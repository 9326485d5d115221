"""Small helpers the page templates share: state badges, units, the active nav item."""
from __future__ import annotations

from django import template
from django.utils.html import format_html

register = template.Library()


@register.filter
def badge(value: str) -> str:
    """A coloured pill for a job or node state; the colour comes from static/css/deepopt.css."""
    value = str(value or "")
    return format_html('<span class="badge badge-{}">{}</span>', value, value.replace("_", " "))


@register.filter
def priority(value: str) -> str:
    value = str(value or "")
    return format_html('<span class="prio prio-{}">{}</span>', value, value)


@register.filter
def gb(memory_mb: int | None) -> str:
    if memory_mb is None:
        return "—"
    return f"{memory_mb / 1024:.0f} GB"


@register.filter
def flat_items(spec: dict, prefix: str = "") -> list[tuple[str, object]]:
    """A nested spec as ("quantization.mode", "auto") rows, for a definition list."""
    rows: list[tuple[str, object]] = []
    for key, value in (spec or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows.extend(flat_items(value, f"{name}."))
        else:
            rows.append((name, value))
    return rows


@register.simple_tag(takes_context=True)
def nav_active(context: template.Context, *url_names: str) -> str:
    match = getattr(context.get("request"), "resolver_match", None)
    return "active" if match is not None and match.url_name in url_names else ""


@register.filter
def busy_count(gpus) -> int:  # noqa: ANN001
    """GPUs annotated busy (see the views' prefetch); counted in Python, no query."""
    return sum(1 for gpu in gpus if getattr(gpu, "busy", False))
