"""Which tensors are critical: they never take a lossy codec, whatever the levels' codecs are.

Biases and norm parameters are tiny and steer every activation; embedding rows of rare tokens get few
updates, so a quantization error there is not averaged away. They go exact (or bf16 at most).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CriticalPolicy:
    """Which tensors never take a lossy codec (parsed from e.g. "bias,norm,embedding,small:4096")."""

    bias: bool = True
    norm: bool = True
    embedding: bool = True
    small: int = 1024

    @classmethod
    def parse(cls, text: str) -> CriticalPolicy:
        kinds = {k.strip() for k in text.split(",") if k.strip()}
        small = 0
        for k in list(kinds):
            if k.startswith("small:"):
                kinds.discard(k)
                if not k[6:].isdigit():
                    raise ValueError(f"small:N needs a whole number of elements, got {k!r}")
                small = int(k[6:])
        unknown = kinds - {"bias", "norm", "embedding", "none"}
        if unknown:
            raise ValueError(f"unknown critical tensor kind(s) {sorted(unknown)}; "
                             "known: bias, norm, embedding, small:N")
        return cls(bias="bias" in kinds, norm="norm" in kinds, embedding="embedding" in kinds, small=small)


def classify(model, policy: CriticalPolicy) -> dict[int, str]:
    """Map each trainable parameter (by id) to "compressed", "critical" or "embedding"."""
    from torch import nn

    norm_types = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)
    kinds: dict[int, str] = {}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in kinds:
                continue
            if policy.embedding and isinstance(module, nn.Embedding):
                kinds[id(p)] = "embedding"
            elif (policy.norm and isinstance(module, norm_types)) or (policy.bias and (name == "bias" or p.dim() < 2)) \
                    or p.numel() < policy.small:
                kinds[id(p)] = "critical"
            else:
                kinds[id(p)] = "compressed"
    return kinds
