"""The job submission form: flat HTML fields in, the API's nested body out, the API's errors back in.

The page validates with the API's own JobCreateSerializer, so a browser user and a REST client meet the
same rules and the same messages. This module only translates between the two shapes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from django.http import QueryDict

from apps.scheduling.specs import COMPRESSION_MODELS, TRAINING_MODELS

Path = tuple[str, ...]


@dataclass(frozen=True)
class FormField:
    name: str  # the HTML input's name
    path: Path  # where its value goes in the API body
    checkbox: bool = False


COMMON_FIELDS = (
    FormField("name", ("name",)),
    FormField("team", ("team",)),
    FormField("kind", ("kind",)),
    FormField("priority", ("priority",)),
    FormField("gpus", ("resources", "gpus")),
    FormField("nodes", ("resources", "nodes")),
    FormField("gpu_memory_gb", ("resources", "gpu_memory_gb")),
    FormField("walltime_minutes", ("walltime_minutes",)),
    FormField("depends_on", ("depends_on",)),  # "12, 13": the API's list of job ids
)
KIND_FIELDS = {
    "compression": (
        FormField("compression_model", ("spec", "model")),
        FormField("weights", ("spec", "weights")),
        FormField("quantization_mode", ("spec", "quantization", "mode")),
        FormField("max_quality_drop", ("spec", "quantization", "max_quality_drop")),
        FormField("rounding", ("spec", "quantization", "rounding")),
        FormField("keep_ratio", ("spec", "pruning", "keep_ratio")),
        FormField("drop_blocks", ("spec", "pruning", "drop_blocks")),
    ),
    "training": (
        FormField("training_model", ("spec", "model")),
        FormField("steps", ("spec", "steps")),
        FormField("batch_size", ("spec", "batch_size")),
        FormField("lr", ("spec", "lr")),
        FormField("lr_warmup", ("spec", "lr_warmup")),
        FormField("hcof_intra_node", ("spec", "hcof", "intra_node")),
        FormField("hcof_inter_node", ("spec", "hcof", "inter_node")),
        FormField("hcof_critical", ("spec", "hcof", "critical")),
        FormField("hcof_overlap", ("spec", "hcof", "overlap"), checkbox=True),
    ),
}
# The form's one choice of weight formats, each a preset of the API's quantization.formats / linear_formats.
FORMAT_PRESETS: dict[str, tuple[str, dict]] = {
    "": ("Any — the fewest bits within the budget", {}),
    "fp8-linear": ("Linear layers FP8 (tensor cores), embeddings int8/int4",
                   {"formats": ["int8", "int4_g64"], "linear_formats": ["fp8_e4m3"]}),
    "fp8-static": ("Linear layers FP8 with static input scales (fastest on FP8 GPUs; minilm-l6, bert-base)",
                   {"formats": ["int8", "int4_g64"], "linear_formats": ["fp8_e4m3"], "fp8_inputs": "static"}),
    "integer": ("int8 and int4 only", {"formats": ["int8", "int4_g64"]}),
}

# Errors on a whole group (e.g. "over the team's GPUs per job") are shown at the top of that group.
SECTIONS: dict[Path, str] = {("resources",): "resources", ("spec",): "spec"}
NON_FIELD = "__all__"

INITIAL = {
    "kind": "compression",
    "priority": "normal",
    "gpus": "1",
    "nodes": "1",
    "compression_model": COMPRESSION_MODELS[0],
    "quantization_mode": "auto",
    "max_quality_drop": "",  # the model's own default (the API's)
    "rounding": "gptq",
    "training_model": TRAINING_MODELS[0],
    "steps": "100",
    "batch_size": "32",
    "hcof_intra_node": "none",
    "hcof_inter_node": "int4",
    "hcof_critical": "none",
    "hcof_overlap": True,
}


@dataclass
class JobForm:
    """What the template needs: the values to show and the errors per field or group."""

    values: dict = field(default_factory=lambda: dict(INITIAL))
    errors: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def from_post(cls, post: QueryDict) -> JobForm:
        values = {key: post.get(key, "") for key in post if key != "csrfmiddlewaretoken"}
        # An unchecked box sends nothing; remember that it was unchecked.
        values["hcof_overlap"] = "hcof_overlap" in post
        return cls(values=values)

    @property
    def kind(self) -> str:
        return str(self.values.get("kind", ""))

    def fields(self) -> tuple[FormField, ...]:
        return COMMON_FIELDS + KIND_FIELDS.get(self.kind, ())

    def payload(self) -> dict:
        """The API body. Empty inputs are left out so that the API's defaults apply, as for a REST client."""
        body: dict = {"spec": {}}
        for f in self.fields():
            value = self.values.get(f.name, "")
            if f.checkbox:
                value = bool(value)
            else:
                value = str(value).strip()
                if value == "":
                    continue
            if f.name == "depends_on":
                value = [part for part in re.split(r"[,\s]+", value) if part]
            node = body
            for key in f.path[:-1]:
                node = node.setdefault(key, {})
            node[f.path[-1]] = value
        if self.kind == "compression":
            preset = str(self.values.get("format_preset", "")).strip()
            # An unknown preset reaches the API as a format, so its "not a valid choice" comes back here.
            chosen = FORMAT_PRESETS[preset][1] if preset in FORMAT_PRESETS else {"formats": [preset]}
            if chosen:
                body["spec"].setdefault("quantization", {}).update(
                    {k: list(v) if isinstance(v, list | tuple) else v for k, v in chosen.items()})
        return body

    def set_errors(self, serializer_errors: dict) -> None:
        by_path = {f.path: f.name for f in self.fields()}
        if self.kind == "compression":
            by_path[("spec", "quantization", "formats")] = "format_preset"
            by_path[("spec", "quantization", "linear_formats")] = "format_preset"
            by_path[("spec", "quantization", "fp8_inputs")] = "format_preset"
        self.errors = {}
        for path, messages in flatten_errors(serializer_errors):
            # A field's own error, or one of its items' (a list's entry comes back as path + index).
            target = by_path.get(path) or (by_path.get(path[:-1]) if path[-1:] and path[-1].isdigit() else None)
            if target is None:
                # Walk up to the nearest group the page shows, else the form as a whole.
                target = next((SECTIONS[path[:n]] for n in range(len(path), 0, -1) if path[:n] in SECTIONS),
                              NON_FIELD)
                # Say which input a message is about when the page has no input of that name.
                unshown = path[len(_section_path(target)):]
                if unshown:
                    messages = [f"{'.'.join(unshown)}: {m}" for m in messages]
            self.errors.setdefault(target, []).extend(messages)


def _section_path(section: str) -> Path:
    return next((path for path, name in SECTIONS.items() if name == section), ())


def flatten_errors(errors, path: Path = ()) -> list[tuple[Path, list[str]]]:
    """DRF's nested errors as (path, messages); `non_field_errors` belongs to the enclosing path."""
    if isinstance(errors, dict):
        out: list[tuple[Path, list[str]]] = []
        for key, value in errors.items():
            sub = path if key == "non_field_errors" else (*path, str(key))
            out.extend(flatten_errors(value, sub))
        return out
    if isinstance(errors, list | tuple):
        if all(not isinstance(item, dict | list) for item in errors):
            return [(path, [str(item) for item in errors])]
        out = []
        for item in errors:
            out.extend(flatten_errors(item, path))
        return out
    return [(path, [str(errors)])]
