"""Deploy-time rewrites that keep a model's function and make it faster on GPUs (like folding BatchNorm).

`fold_rmsnorm_weights`: a Llama's RMSNorm weights folded into the projections after them (norms of ones).

`space_to_depth_stem`: a k x k, stride-2 convolution over few input channels (ResNet's 7x7 stem over RGB)
is rewritten exactly as pixel_unshuffle(2) followed by a ceil(k/2) x ceil(k/2) stride-1 convolution over 4x
the channels. Three input channels suit the GPU's convolution kernels badly: on an H200, the kernel that
runs ResNet-50's 7x7 stem was the costliest of its profile at batch 64 (about 0.4 ms of 3 ms, however much
of the rest was pruned), and the rewrite took 0.2-0.55 ms off pruned models (docs/compression.md). Applied
to the unpruned and the pruned model alike, it is a setting, not a compression.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SpaceToDepthConv(nn.Module):
    """Exactly `conv` (k x k, stride 2, padding p, no dilation or groups), computed as pixel_unshuffle + conv."""

    def __init__(self, conv: nn.Conv2d, channel_multiple: int = 1):
        super().__init__()
        (k, k2), (s, s2), (p, p2) = conv.kernel_size, conv.stride, conv.padding
        if (k, s, p) != (k2, s2, p2) or s != 2 or conv.groups != 1 or conv.dilation != (1, 1):
            raise ValueError("space_to_depth needs a square stride-2 convolution without groups or dilation")
        out_c, in_c = conv.out_channels, conv.in_channels
        half = (k + 1) // 2
        w = conv.weight.new_zeros(out_c, in_c, 2 * half, 2 * half)
        w[:, :, :k, :k] = conv.weight.detach()
        # w[o, c, 2i + a, 2j + b] -> w4[o, c*4 + a*2 + b, i, j]: pixel_unshuffle's channel order.
        w4 = w.view(out_c, in_c, half, 2, half, 2).permute(0, 1, 3, 5, 2, 4).reshape(out_c, in_c * 4, half, half)
        channels = -(-in_c * 4 // channel_multiple) * channel_multiple
        if channels > in_c * 4:
            w4 = torch.cat([w4, w4.new_zeros(out_c, channels - in_c * 4, half, half)], dim=1)
        self.pad, self.extra = p, channels - in_c * 4
        self.conv = nn.Conv2d(
            channels, out_c, half, 1, 0, bias=conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype
        )
        with torch.no_grad():
            self.conv.weight.copy_(w4)
            if conv.bias is not None:
                self.conv.bias.copy_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        # Pad as the original conv does, and one more row/column where needed so the size is even.
        p = self.pad
        x = F.pad(x, (p, p + (w + 2 * p) % 2, p, p + (h + 2 * p) % 2))
        z = F.pixel_unshuffle(x, 2)
        if self.extra:
            z = F.pad(z, (0, 0, 0, 0, 0, self.extra))
        return self.conv(z)


def space_to_depth_stem(model: nn.Module, channel_multiple: int = 1) -> int:
    """Rewrite every stride-2 convolution over at most 4 input channels; returns how many were rewritten."""
    count = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if (
                isinstance(child, nn.Conv2d)
                and child.in_channels <= 4
                and child.stride == (2, 2)
                and child.kernel_size[0] == child.kernel_size[1]
                and child.kernel_size[0] > 2
            ):
                setattr(module, child_name, SpaceToDepthConv(child, channel_multiple))
                count += 1
    return count


def fold_rmsnorm_weights(lm: nn.Module) -> int:
    """Fold each RMSNorm's weight of a Llama-architecture decoder (`LlamaForCausalLM`, or a module holding
    one as `.lm`) into the projections that read the norm's output, and set the norm's weight to ones.

    An RMSNorm computes g * x / rms(x); the Linear after it computes W (g * x / rms(x)) = (W diag g) x / rms(x).
    So W's columns are scaled by g (Q/K/V by the input norm, gate/up by the post-attention norm, lm_head by
    the final norm) and g becomes 1: the model computes the same function (up to the rounding of the
    scaled weights), and a decode kernel need not read the norm (`triton_decode.RMSNORM_UNIT`). Apply it
    before sensitivity and quantization, so that they see the weights the kernels will multiply by. A
    tied lm_head gets its own, scaled copy (the embedding is left alone). Returns the number of norms
    whose weights were not already all ones."""
    lm = getattr(lm, "lm", lm)
    model = lm.model
    folded = 0

    def fold(norm: nn.Module, linears: list[nn.Linear]) -> None:
        nonlocal folded
        g = norm.weight.detach()
        if bool((g == 1).all()):
            return
        for lin in linears:
            scaled = lin.weight.detach() * g.to(lin.weight.dtype)[None, :]
            lin.weight = nn.Parameter(scaled, requires_grad=lin.weight.requires_grad)  # unties a shared weight
        with torch.no_grad():
            norm.weight.fill_(1)
        folded += 1

    for block in model.layers:
        att, mlp = block.self_attn, block.mlp
        fold(block.input_layernorm, [att.q_proj, att.k_proj, att.v_proj])
        fold(block.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
    fold(model.norm, [lm.lm_head])
    return folded
