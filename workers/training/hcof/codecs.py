"""Gradient codecs, one per hierarchy level, and the error feedback that keeps lossy ones convergent.

Element-wise codecs work on a (parts, m) view: row i is the piece bound for peer i in an all-to-all,
so every peer receives a compressed piece it decodes and sums itself (quantized values cannot be summed
on the wire). `m` is always a multiple of CHUNK, which the reducer guarantees by padding buckets.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Elements that share one quantization scale; also the alignment every shard is padded to.
CHUNK = 256
CODEC_NAMES = ("none", "bf16", "topk:RATIO", "int8", "int4", "powersgd:RANK")


class CodecError(ValueError):
    """An unknown codec name or an out-of-range parameter (told to the user in one line)."""


# Codecs import torch where they run, so the launcher validates arguments without loading it.
Wire = dict  # name -> torch.Tensor


def wire_bytes(wire: Wire) -> int:
    return sum(t.numel() * t.element_size() for t in wire.values())


@dataclass(frozen=True)
class Codec:
    name: str

    lossy = False
    error_feedback = False
    elementwise = True

    def encode(self, x: torch.Tensor) -> Wire:  # x: (parts, m) float32
        raise NotImplementedError

    def decode(self, wire: Wire, m: int) -> torch.Tensor:  # -> (parts, m) float32
        raise NotImplementedError

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Plain(Codec):
    def encode(self, x: torch.Tensor) -> Wire:
        return {"v": x.contiguous()}

    def decode(self, wire: Wire, m: int) -> torch.Tensor:
        return wire["v"].float()


@dataclass(frozen=True)
class Bf16(Codec):
    lossy = True

    def encode(self, x: torch.Tensor) -> Wire:
        import torch
        return {"v": x.to(torch.bfloat16)}

    def decode(self, wire: Wire, m: int) -> torch.Tensor:
        return wire["v"].float()


@dataclass(frozen=True)
class IntQuant(Codec):
    """Symmetric per-chunk quantization; int4 packs two values in a byte (ZeRO++-style blocks)."""

    bits: int = 8
    lossy = True
    error_feedback = True

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def encode(self, x: torch.Tensor) -> Wire:
        import torch
        parts, m = x.shape
        blocks = x.reshape(parts, m // CHUNK, CHUNK)
        scale = blocks.abs().amax(dim=2).clamp_min(1e-30) / self.qmax
        q = torch.round(blocks / scale.unsqueeze(2)).clamp_(-self.qmax, self.qmax).to(torch.int8)
        q = q.reshape(parts, m)
        if self.bits == 4:
            u = (q + 8).to(torch.uint8)  # 1..15, so the nibbles never need a sign
            q = u[:, 0::2] | (u[:, 1::2] << 4)
        return {"q": q.contiguous(), "scale": scale.contiguous()}

    def decode(self, wire: Wire, m: int) -> torch.Tensor:
        import torch
        q, scale = wire["q"], wire["scale"]
        parts = q.shape[0]
        if self.bits == 4:
            out = torch.empty(parts, m, dtype=torch.int8, device=q.device)
            out[:, 0::2] = (q & 0x0F).to(torch.int8) - 8
            out[:, 1::2] = (q >> 4).to(torch.int8) - 8
            q = out
        vals = q.reshape(parts, m // CHUNK, CHUNK).float() * scale.unsqueeze(2)
        return vals.reshape(parts, m)


@dataclass(frozen=True)
class TopK(Codec):
    """Keep the `ratio` largest magnitudes of each part (Deep Gradient Compression), sent as index/value pairs."""

    ratio: float = 0.01
    lossy = True
    error_feedback = True

    def k(self, m: int) -> int:
        return max(1, math.ceil(self.ratio * m))

    def encode(self, x: torch.Tensor) -> Wire:
        import torch
        k = self.k(x.shape[1])
        idx = x.abs().topk(k, dim=1, sorted=False).indices
        return {"idx": idx.to(torch.int32), "val": x.gather(1, idx).contiguous()}

    def decode(self, wire: Wire, m: int) -> torch.Tensor:
        import torch
        idx, val = wire["idx"], wire["val"]
        out = torch.zeros(idx.shape[0], m, dtype=torch.float32, device=val.device)
        return out.scatter_(1, idx.long(), val.float())


@dataclass(frozen=True)
class PowerSGD(Codec):
    """Rank-r approximation (Vogels et al.); its factors are linear in the gradient, so they may be all-reduced."""

    rank: int = 4
    lossy = True
    error_feedback = True
    elementwise = False


def parse_codec(text: str) -> Codec:
    name, _, arg = text.strip().partition(":")
    if name in ("none", "fp32") and not arg:
        return Plain("none")
    if name == "bf16" and not arg:
        return Bf16("bf16")
    if name in ("int8", "int4") and not arg:
        return IntQuant(name, bits=int(name[3:]))
    if name == "topk":
        try:
            ratio = float(arg)
        except ValueError:
            raise CodecError(f"topk needs a ratio, as in topk:0.01 (got {text!r})") from None
        if not 0 < ratio <= 1:
            raise CodecError(f"the topk ratio must be in (0, 1], got {arg}")
        return TopK(f"topk:{arg}", ratio=ratio)
    if name == "powersgd":
        if not arg.isdigit() or int(arg) < 1:
            raise CodecError(f"powersgd needs a positive integer rank, as in powersgd:4 (got {text!r})")
        return PowerSGD(f"powersgd:{arg}", rank=int(arg))
    raise CodecError(f"unknown codec {text!r}; known: {', '.join(CODEC_NAMES)}")


class ErrorFeedback:
    """Residuals of lossy compression, added back before the next compression of the same slot."""

    def __init__(self) -> None:
        self.residuals: dict[str, torch.Tensor] = {}

    def compress(self, key: str, codec: Codec, x: torch.Tensor) -> Wire:
        if not codec.error_feedback:
            return codec.encode(x)
        res = self.residuals.get(key)
        corrected = x + res if res is not None else x.clone()
        wire = codec.encode(corrected)
        self.residuals[key] = corrected.sub_(codec.decode(wire, x.shape[1]))
        return wire

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.cpu() for k, v in self.residuals.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], device: torch.device) -> None:
        self.residuals = {k: v.to(device) for k, v in state.items()}
