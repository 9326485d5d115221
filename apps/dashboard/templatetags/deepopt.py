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


# The rows of a compression result's summary: (label, key in baseline/compressed, how to show a value).
COMPRESSION_ROWS = (
    ("Quality", "quality", "{:.4f}"),
    ("Quality as executed", "executed_quality", "{:.4f}"),
    ("Weights", "weight_bytes", "bytes"),
    ("Parameters", "params", "{:,}"),
    ("MACs", "macs", "{:,}"),
    ("Latency (ms)", "latency_ms", "{:.2f}"),
)


def _show(value: object, how: str) -> str:
    if value is None:
        return "—"
    if how == "bytes":
        size = float(value)  # decimal units, one decimal: a 42 kB digits CNN must not read "0.0 MB"
        for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
            if size >= scale:
                return f"{size / scale:.1f} {unit}"
        return f"{size:.0f} B"
    try:
        return how.format(value)
    except (TypeError, ValueError):
        return str(value)


@register.filter
def compression_summary(result: dict | None) -> list[tuple[str, str, str, str]]:
    """A compression result's baseline against compressed: (label, before, after, change) rows, only the
    measures the report has. Change: "4.39x smaller" / "1.25x slower" for sizes, counts and latency, the
    difference for quality."""
    before, after = (result or {}).get("baseline") or {}, (result or {}).get("compressed") or {}
    rows = []
    for label, key, how in COMPRESSION_ROWS:
        if key not in before and key not in after:
            continue
        a = before.get(key, before.get("quality") if key == "executed_quality" else None)
        b = after.get(key)
        change = ""
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            if key in ("quality", "executed_quality"):
                change = f"{b - a:+.4f}"
            elif a == b:
                change = "same"
            elif a > 0 and b > 0:
                less, more = ("faster", "slower") if key == "latency_ms" else ("smaller", "larger")
                change = f"{a / b:.2f}x {less}" if b < a else f"{b / a:.2f}x {more}"
        rows.append((label, _show(a, how), _show(b, how), change))
    return rows


@register.filter
def result_items(result: dict | None, kind: str = "") -> list[tuple[str, object]]:
    """The job result as flat rows, less what the page shows in its own cards (a compression job's
    per-layer rows and its before/after summary, a training job's loss curve)."""
    hidden = {"compression": {"layers", "baseline", "compressed"}, "training": {"loss_curve"}}.get(kind, set())
    rows = flat_items({k: v for k, v in (result or {}).items() if k not in hidden})
    # A static-FP8 run's input scale per layer (48 for bert-base) is for the artifact, not for reading.
    scales = [name for name, _ in rows if ".input_scales." in name]
    if scales:
        prefix = scales[0].split(".input_scales.")[0] + ".input_scales"
        rows = [row for row in rows if ".input_scales." not in row[0]]
        rows.append((prefix, f"{len(scales)} layers (in the artifact's manifest.json)"))
    return rows


@register.simple_tag(takes_context=True)
def nav_active(context: template.Context, *url_names: str) -> str:
    match = getattr(context.get("request"), "resolver_match", None)
    return "active" if match is not None and match.url_name in url_names else ""


@register.filter
def busy_count(gpus) -> int:  # noqa: ANN001
    """GPUs annotated busy (see the views' prefetch); counted in Python, no query."""
    return sum(1 for gpu in gpus if getattr(gpu, "busy", False))
