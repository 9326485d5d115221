"""GPTQ rounding for int4 Linear weights (Frantar et al., ICLR 2023), into quantize's packed format.

Round-to-nearest (RTN) quantizes every weight on its own. GPTQ quantizes the inputs of a row one
after another and, after each, moves the rounding error onto the inputs not yet quantized, weighted
by H = sum of x x^T over the calibration inputs of that layer, so that the layer's *outputs* on data
like the calibration data move as little as possible. Groups keep quantize's int4 format (asymmetric,
an fp16 scale and minimum per group of G inputs, two codes per byte), with each group's scale and
minimum taken from the weights as they stand when GPTQ reaches the group — so the packed tensors are
exactly what `quantize.pack()` would store, and they unpack the same way.

H comes from one pass of fitting inputs through the unquantized (possibly pruned) model
(`collect_hessians`); the engine keeps those inputs apart from the calibration set it scores
sensitivities on (`Task.gptq_split`). With H = identity, GPTQ is RTN exactly (a unit test checks it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

DAMP = 0.01  # added to H's diagonal, as a share of its mean diagonal (the paper's default)
BLOCK = 128  # inputs updated together before the error is pushed to the rest


def collect_hessians(layers: dict[str, nn.Module], run: Callable[[], object]) -> dict[str, torch.Tensor]:
    """{name: H} for the Linear layers among `layers`, summed over what `run()` feeds the model."""
    linear = {n: m for n, m in layers.items() if isinstance(m, nn.Linear)}
    hess = {
        n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64, device=m.weight.device)
        for n, m in linear.items()
    }

    def hook_for(name):
        def hook(_module, inputs, _output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            hess[name].add_(x.T @ x)

        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in linear.items()]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return {n: h.float() for n, h in hess.items()}


def gptq_int4(w: torch.Tensor, hessian: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    """Packed int4 tensors {'q', 'scale', 'zero'} for a (rows, cols) weight, cols divisible by `group`."""
    rows, cols = w.shape
    if cols % group:
        raise ValueError(f"GPTQ needs the group ({group}) to divide the inputs ({cols})")
    W = w.detach().double().clone()
    H = hessian.detach().double().clone().to(W.device)
    # An input that is zero on all the fitting data: its weights are rounded to nearest (H's row and
    # column are zero but the diagonal, so no error moves to or from it), not dropped as in the paper's
    # code, since other data may use it.
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    H += DAMP * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype, device=H.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.zeros(rows, cols, dtype=torch.uint8, device=W.device)
    scales = torch.zeros(rows, cols // group, dtype=torch.float16, device=W.device)
    zeros = torch.zeros_like(scales)
    for b0 in range(0, cols, BLOCK):
        b1 = min(b0 + BLOCK, cols)
        err = torch.zeros(rows, b1 - b0, dtype=W.dtype, device=W.device)
        for c in range(b0, b1):
            if c % group == 0:
                # This group's grid, from its weights as the earlier errors have left them.
                # The grid and the codes in float32, as quantize.pack() computes them.
                cur = W[:, c : c + group].float()
                lo, hi = cur.amin(dim=1), cur.amax(dim=1)
                scale = ((hi - lo) / 15.0).clamp(min=1e-8).to(torch.float16)
                zero = lo.to(torch.float16)
                scales[:, c // group], zeros[:, c // group] = scale, zero
                s, z = scale.float(), zero.float()
            col = W[:, c]
            q = torch.clamp(torch.round((col.float() - z) / s), 0, 15)
            codes[:, c] = q.to(torch.uint8)
            e = (col - (q * s + z).double()) / hinv[c, c]
            W[:, c:b1] -= e[:, None] * hinv[c, c:b1][None, :]
            err[:, c - b0] = e
        W[:, b1:] -= err @ hinv[b0:b1, b1:]
    flat = codes.reshape(-1)
    nibbles = (flat[0::2] | (flat[1::2] << 4)).contiguous()
    return {"q": nibbles, "scale": scales, "zero": zeros}
