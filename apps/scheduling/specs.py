"""The kind-specific part of a job (`spec`), each kind validated by its own serializer."""
from __future__ import annotations

import re

from rest_framework import serializers

from apps.accounts.api.base import StrictSerializer

# The model catalogs the runners know (workers/compression/models.py, workers/training/).
COMPRESSION_MODELS = ("minilm-l6", "digits-cnn", "resnet50", "bert-base", "llama-1b")
# Models whose quality metric is a percentage (top-1 accuracy); the others' is a mean cosine (<= 1).
PERCENT_QUALITY_MODELS = ("digits-cnn",)
TRAINING_MODELS = ("digits-mlp", "resnet50", "bert-base", "gpt2-small")

# Weight formats a compression job may restrict its assignment to (workers/compression/quantize.py).
WEIGHT_FORMATS = ("bf16", "fp8_e4m3", "int8", "int4_g32", "int4_g64", "int4_g128")

CODEC_RE = re.compile(r"^(none|bf16|int8|int4|topk:(?P<ratio>[0-9]*\.?[0-9]+)|powersgd:(?P<rank>[0-9]+))$")


def validate_codec(value: str) -> str:
    match = CODEC_RE.match(value)
    if not match:
        raise serializers.ValidationError(
            "Use none, bf16, int8, int4, topk:RATIO (0 < RATIO < 1) or powersgd:RANK (1-64)."
        )
    if match["ratio"] is not None and not 0 < float(match["ratio"]) < 1:
        raise serializers.ValidationError("topk RATIO must be between 0 and 1, e.g. topk:0.01.")
    if match["rank"] is not None and not 1 <= int(match["rank"]) <= 64:
        raise serializers.ValidationError("powersgd RANK must be between 1 and 64.")
    return value


STATIC_FP8_MODELS = ("minilm-l6", "bert-base")  # workers/compression/engine.py's STATIC_FP8_ARCHES


class QuantizationSpec(StrictSerializer):
    mode = serializers.ChoiceField(choices=["auto", "preset", "off"], default="auto")
    max_quality_drop = serializers.FloatField(
        min_value=0.0, max_value=100.0, required=False,
        help_text="Largest allowed drop in the model's quality metric, in that metric's own units (what the result "
                  "reports): top-1 accuracy points for digits-cnn (0.3 = 0.3 points, its default), mean cosine to "
                  "the original model for the other models (0.01, their default; at most 1). Omitted: the model's "
                  "default.",
    )
    rounding = serializers.ChoiceField(
        choices=["gptq", "rtn"], required=False,
        help_text="How int4 Linear weights are rounded: gptq (from calibration data, the default) or rtn "
                  "(to nearest).",
    )
    formats = serializers.ListField(
        child=serializers.ChoiceField(choices=WEIGHT_FORMATS), min_length=1, required=False,
        help_text="Weight formats the sensitivity-driven assignment may choose from (default: bf16, fp8_e4m3, "
                  "int8, int4_g64).",
    )
    linear_formats = serializers.ListField(
        child=serializers.ChoiceField(choices=WEIGHT_FORMATS), min_length=1, required=False,
        help_text="Formats for Linear layers only (default: formats). ['fp8_e4m3'] keeps every Linear on the FP8 "
                  "tensor-core path of GPUs that have one, while embeddings may still go to int4.",
    )
    fp8_inputs = serializers.ChoiceField(
        choices=["dynamic", "static"], required=False,
        help_text="How fp8_e4m3 Linear layers quantize their inputs: dynamic (a scale per token, measured on every "
                  "call; the default) or static (one scale per layer, calibrated once and stored with the model; "
                  "Q/K/V in one GEMM; the fastest on FP8 tensor cores). static: minilm-l6 and bert-base only.",
    )


    def validate(self, attrs: dict) -> dict:
        if attrs.get("mode", "auto") != "auto":
            for key in ("formats", "linear_formats"):
                if key in attrs:
                    raise serializers.ValidationError(
                        {key: [f"Formats are chosen by the auto mode only; mode {attrs['mode']!r} does not use them."]})
        return attrs


class PruningSpec(StrictSerializer):
    keep_ratio = serializers.FloatField(
        min_value=0.05, max_value=1.0, default=0.7, help_text="Share of channels, heads and neurons to keep."
    )
    drop_blocks = serializers.IntegerField(
        min_value=0, max_value=12, required=False,
        help_text="Whole residual blocks to remove as well (resnet50 only, which has 12 that may go), the least "
                  "important per MAC first.",
    )


class CompressionSpec(StrictSerializer):
    model = serializers.ChoiceField(choices=COMPRESSION_MODELS)
    weights = serializers.IntegerField(
        min_value=1, max_value=2**63 - 1, required=False,
        help_text="The id of one of the team's uploaded models (POST /api/v1/models/) to compress instead of the "
                  "catalog's weights; it must hold weights of `model`'s architecture.",
    )
    quantization = QuantizationSpec(required=False)
    pruning = PruningSpec(required=False)

    def validate(self, attrs: dict) -> dict:
        attrs.setdefault("quantization", {"mode": "auto"})
        attrs.setdefault("pruning", {"keep_ratio": 1.0})
        drop = attrs["quantization"].get("max_quality_drop")
        if drop is not None and attrs["model"] not in PERCENT_QUALITY_MODELS and drop > 1:
            raise serializers.ValidationError({"quantization": {"max_quality_drop": [
                f"{attrs['model']}'s quality is a mean cosine (at most 1), so a drop is at most 1; "
                f"{drop:g} is more than its whole scale (0.01 is the default)."]}})
        if attrs["quantization"].get("fp8_inputs") == "static":
            if attrs["model"] not in STATIC_FP8_MODELS:
                raise serializers.ValidationError({"quantization": {"fp8_inputs": [
                    f"Static FP8 inputs run BERT encoders only ({', '.join(STATIC_FP8_MODELS)}), not "
                    f"{attrs['model']}."]}})
            if attrs["quantization"].get("mode", "auto") == "off":
                raise serializers.ValidationError({"quantization": {"fp8_inputs": [
                    "Static FP8 inputs need quantization: mode auto or preset, not off."]}})
        if attrs["pruning"].get("drop_blocks") and attrs["model"] != "resnet50":
            raise serializers.ValidationError(
                {"pruning": {"drop_blocks": ["Only resnet50 has residual blocks that may be removed."]}})
        return attrs


class HcofSpec(StrictSerializer):
    intra_node = serializers.CharField(default="none", validators=[validate_codec], max_length=32)
    inter_node = serializers.CharField(default="int4", validators=[validate_codec], max_length=32)
    critical = serializers.ChoiceField(choices=["none", "bf16"], default="none")
    overlap = serializers.BooleanField(default=True)


class TrainingSpec(StrictSerializer):
    model = serializers.ChoiceField(choices=TRAINING_MODELS)
    steps = serializers.IntegerField(min_value=1, max_value=10_000_000, default=100)
    batch_size = serializers.IntegerField(min_value=1, max_value=65_536, default=32)
    # Left out: the runner's defaults per model (workers/training/catalog.py). lr_warmup: steps over which the
    # rate rises linearly to lr.
    lr = serializers.FloatField(required=False, min_value=1e-8, max_value=10.0)
    lr_warmup = serializers.IntegerField(required=False, min_value=0, max_value=10_000_000)
    hcof = HcofSpec(required=False)

    def validate(self, attrs: dict) -> dict:
        if "hcof" not in attrs:
            attrs["hcof"] = HcofSpec().to_internal_value({})
        return attrs


class SelftestSpec(StrictSerializer):
    """The self-test job (workers/selftest.py): integrates 4/(1+x²) over [0, 1] in `steps` chunks, one
    progress line a chunk, and returns π with its error. It checks that a node runs jobs end to end
    without the minutes a real model takes; `crash_at_step` checks that a failing runner is reported."""

    steps = serializers.IntegerField(min_value=1, max_value=100_000, default=20)
    step_seconds = serializers.FloatField(min_value=0.0, max_value=60.0, default=0.1,
                                          help_text="Each chunk takes at least this long (paced).")
    crash_at_step = serializers.IntegerField(min_value=1, max_value=100_000, required=False, allow_null=True,
                                             default=None, help_text="Raise an error at this step.")


SPEC_SERIALIZERS = {"compression": CompressionSpec, "training": TrainingSpec, "selftest": SelftestSpec}
