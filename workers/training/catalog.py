"""The models the runner knows, with their default per-process batch and sequence length (no torch import)."""
from __future__ import annotations

MODELS = ("digits-mlp", "resnet50", "bert-base", "gpt2-small")
DEFAULT_BATCH = {"digits-mlp": 32, "resnet50": 32, "bert-base": 32, "gpt2-small": 8}
DEFAULT_SEQ = {"bert-base": 128, "gpt2-small": 1024, "resnet50": 224}
DEFAULT_LR = {"digits-mlp": 1e-3, "resnet50": 1e-3, "bert-base": 1e-4, "gpt2-small": 1e-4}
# Steps of linear learning-rate warm-up when --lr-warmup is not given. BERT is post-LayerNorm: without a warm-up
# two-GPU DDP fp32 sat on the synthetic task's plateau for 600 steps; with 50 it leaves it by step 32
# (docs/training.md). GPT-2 is pre-LayerNorm and the others have no attention.
DEFAULT_LR_WARMUP = {"bert-base": 50}
