"""Executing `fp8_e4m3` Linear weights with FP8 tensor cores: W8A8, per output row and per token.

The packed `fp8_e4m3` format (quantize.pack) is an e4m3 weight with one fp32 scale per output row.
`Fp8Linear` computes with exactly those weights: each forward quantizes its input per token (row) to
e4m3 with a dynamic scale (amax / 448), and one `torch._scaled_mm` multiplies the two FP8 operands on
the tensor cores (sm89+: Ada, Hopper), applying the row and token scales in its epilogue and writing
bf16. On an H200 an FP8 GEMM has twice the tensor-core rate of bf16, which is what can make a
quantized encoder *faster* than bf16 at large batches, where the GEMMs are compute-bound; weight-only
int4 cannot (it dequantizes to bf16 and multiplies at bf16's rate, after a detour).

What the activation quantization costs in quality is not in the packed weights' quality: it is
measured as the executed quality (`executed_quality` in the report; `bench/fp8_encoder.py`).

Elsewhere (CPU, older GPUs, shapes the kernel refuses) the same arithmetic is simulated: the input is
rounded through e4m3 per token and multiplied with the dequantized weight, so tests on this machine
check the numbers a GPU computes, up to accumulation order.
"""
from __future__ import annotations

import torch
from torch import nn

from .quantize import set_module

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
EPS = 1e-12


def kernel_shape(out_features: int, in_features: int) -> bool:
    """What `torch._scaled_mm` takes: inner and outer sizes in multiples of 16."""
    return in_features % 16 == 0 and out_features % 16 == 0


def kernel_available(device: torch.device | str) -> bool:
    """Whether `torch._scaled_mm` with row-wise scales runs here: CUDA, compute capability 8.9+."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 9)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 tensor, fp32 scale of shape (rows, 1)) with x ~= q * scale, one scale per row."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=EPS) / FP8_MAX
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


class Fp8Linear(nn.Module):
    """A Linear whose weight is e4m3 with one scale per output row, computing W8A8 (see the module doc)."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 out_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if qweight.dtype == torch.uint8:
            qweight = qweight.view(FP8)
        if qweight.dtype != FP8 or qweight.dim() != 2:
            raise ValueError("Fp8Linear needs a 2-D float8_e4m3fn (or its uint8 view) weight")
        out_features, in_features = qweight.shape
        if scale.numel() != out_features:
            raise ValueError(f"one scale per output row: {out_features} expected, {scale.numel()} given")
        self.in_features, self.out_features, self.out_dtype = in_features, out_features, out_dtype
        self.register_buffer("qweight", qweight.contiguous())
        # As _scaled_mm takes them: the weight's scales as a (1, out) fp32 row.
        self.register_buffer("scale", scale.detach().float().reshape(1, out_features).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(out_dtype).contiguous())
        self.kernel_shape = kernel_shape(out_features, in_features)

    @classmethod
    def from_packed(cls, packed: dict[str, torch.Tensor], bias: torch.Tensor | None,
                    out_dtype: torch.dtype = torch.bfloat16) -> Fp8Linear:
        """From quantize.pack(w, 'fp8_e4m3'): {'q': uint8 view of e4m3 (out, in), 'scale': (out,)}."""
        return cls(packed["q"], packed["scale"], bias, out_dtype)

    def dequantized_weight(self) -> torch.Tensor:
        return self.qweight.float() * self.scale.reshape(-1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        xq, x_scale = quantize_rows(x2)
        if self.kernel_shape and x.is_cuda:
            # Row-wise scaled FP8 GEMMs write bf16; another output dtype is a cast of that.
            y = torch._scaled_mm(xq, self.qweight.t(), scale_a=x_scale, scale_b=self.scale,
                                 out_dtype=torch.bfloat16, use_fast_accum=True).to(self.out_dtype)
        else:
            y = ((xq.float() * x_scale) @ self.dequantized_weight().t()).to(self.out_dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, W8A8 e4m3 (row x token scales)"


def swap_fp8_linears(model: nn.Module, packed: dict[str, dict[str, torch.Tensor]],
                     out_dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """Replace the Linear layers named in `packed` ({name: fp8_e4m3 pack}) by Fp8Linear, on the layer's
    device; returns the names replaced."""
    modules = dict(model.named_modules())
    done = []
    for name, tensors in packed.items():
        layer = modules[name]
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"{name} is not a Linear layer")
        device = layer.weight.device
        set_module(model, name, Fp8Linear.from_packed({k: v.to(device) for k, v in tensors.items()}, layer.bias,
                                                      out_dtype))
        done.append(name)
    return done
