"""Executing int4 Linear weights at the packed format's own grid with PyTorch's int4 kernels.

quantize's int4 format stores, per group of G inputs of a row, 4-bit codes q, an fp16 scale s and an
fp16 minimum z: w = q * s + z. tinygemm (`torch.ops.aten._weight_int4pack_mm`, CUDA sm80+, bf16)
computes w = (q - 8) * s + z' from its own tile layout, so the same codes go in with z' = z + 8 s —
the packed weights exactly, up to s and z' rounded to bf16. On a CPU, PyTorch's
`_weight_int4pack_mm_for_cpu` takes the same scales and zeros and the codes in its own layout; on
this 2-core machine a 1024 x 384 x 1536 product took 17 ms against fp32's 34 ms. torchao's int4 configs instead choose a
grid of their own from the weights they are given and round again: harmless after round-to-nearest,
but it undoes GPTQ's error compensation (on BERT-base a GPTQ mix fell from 0.993 to 0.955 that way).
"""
from __future__ import annotations

import torch
from torch import nn


def int4_codes(q: torch.Tensor, out_features: int) -> torch.Tensor:
    """quantize's int4 bytes (two codes a byte, low nibble first) -> one code 0..15 per input,
    (out_features, in_features), uint8."""
    return torch.stack([q & 0x0F, q >> 4], dim=-1).reshape(out_features, -1)


def _scales_and_zeros(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The int4 kernels' (groups, N, 2) bf16 table. They compute (code - 8) * s + z', and quantize's
    grid is code * s + zero, so z' = zero + 8 s; only s and z' are rounded to bf16."""
    sz = torch.stack([scale.float(), zero.float() + 8 * scale.float()], dim=-1)  # (N, groups, 2)
    return sz.transpose(0, 1).contiguous().to(torch.bfloat16)


def tinygemm_pack(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, out_features: int,
                  group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, scales_and_zeros) for `_weight_int4pack_mm` from quantize's packed int4 tensors of an
    (out_features, in_features) weight: `q` two codes a byte (low nibble first), `scale` and `zero`
    (out_features, in_features / group). On the tensors' device, which must be CUDA."""
    n_groups = scale.shape[-1]
    q = q.reshape(out_features, n_groups, group // 2)
    # tinygemm wants the even element in the high nibble.
    swapped = ((q & 0x0F) << 4) | (q >> 4)
    packed = torch.ops.aten._convert_weight_to_int4pack(swapped.reshape(out_features, -1).contiguous(), 8)
    return packed, _scales_and_zeros(scale, zero)


def kernel_available(device: torch.device | str) -> bool:
    """CUDA sm80+ (tinygemm), or a CPU build of PyTorch with its CPU int4 kernel."""
    device = torch.device(device)
    if device.type == "cpu":
        return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 0)


def cpu_pack(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, out_features: int,
             group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same for `_weight_int4pack_mm_for_cpu`: it takes the codes one per int32 (low nibble first),
    the scales and zeros as tinygemm does."""
    codes = int4_codes(q, out_features).to(torch.int32).contiguous()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 8)
    return packed, _scales_and_zeros(scale, zero)


def kernel_shape(out_features: int, in_features: int, group: int, device: torch.device | str = "cuda") -> bool:
    """What the kernel takes: groups of 32-256 inputs; tinygemm wants the inputs in tiles of 8 x 16
    (inner_k_tiles 8) and outputs in 8s, the CPU kernel outputs in 16s (checked on torch 2.13)."""
    if group not in (32, 64, 128, 256) or in_features % group:
        return False
    if torch.device(device).type == "cpu":
        return out_features % 16 == 0
    return in_features % 128 == 0 and out_features % 8 == 0


class Int4Linear(nn.Module):
    """A Linear whose weight is the packed int4 format, computed by tinygemm on a CUDA device."""

    def __init__(self, packed: dict[str, torch.Tensor], in_features: int, out_features: int, group: int,
                 bias: torch.Tensor | None, out_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if not kernel_shape(out_features, in_features, group, packed["q"].device):
            raise ValueError(f"tinygemm cannot take a {out_features} x {in_features} weight in groups of {group}")
        device = packed["q"].device
        if not kernel_available(device):
            raise ValueError("Int4Linear runs on a CUDA GPU of compute capability 8.0 or more, or a CPU with "
                             "PyTorch's CPU int4 kernel")
        self.in_features, self.out_features, self.group, self.out_dtype = in_features, out_features, group, out_dtype
        self.on_cpu = device.type == "cpu"
        to_kernel = cpu_pack if self.on_cpu else tinygemm_pack
        weight, sz = to_kernel(packed["q"], packed["scale"], packed["zero"], out_features, group)
        self.register_buffer("weight_int4", weight)
        self.register_buffer("scales_and_zeros", sz)
        self.register_buffer("bias", None if bias is None else bias.detach().to(out_dtype).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        op = torch.ops.aten._weight_int4pack_mm_for_cpu if self.on_cpu else torch.ops.aten._weight_int4pack_mm
        y = op(x2, self.weight_int4, self.group, self.scales_and_zeros)
        y = y.to(self.out_dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        kernel = "CPU int4" if self.on_cpu else "tinygemm"
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 g{self.group} ({kernel})"
