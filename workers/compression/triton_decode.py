"""Triton kernels for one-token decode: a matrix-vector product over packed weights, and attention.

`gemv` reads a projection's packed bytes once (bf16 / fp32, int8 or fp8 with a per-row scale, int4
with an fp16 scale and minimum per group — the layouts `quantize.pack()` writes), dequantizes in
registers and accumulates in fp32. What surrounds a projection in a Llama block is fused into it, so
that a decoder layer needs about half the kernels of the unfused step (measured: 131 against 211–227
a token with the first, one-kernel attention): the RMSNorm of the input (each program recomputes
the norm of the short input vector), SiLU(gate) * up in front of the down projection, and the
residual add after the output and down projections. `attention` splits the static cache
into blocks of positions (one program per query head and block, positions after `pos` masked), then
combines the blocks' partial softmaxes (flash-decoding).

Import needs Triton (on CUDA machines it comes with PyTorch). On a CPU the kernels run under
Triton's interpreter (`TRITON_INTERPRET=1`), which is how the unit tests check them without a GPU.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# gemv weight layouts
W16, W8_ROW, W4_GROUP = 0, 1, 2
# gemv prologues
NONE, RMSNORM, SILU_MUL = 0, 1, 2


@triton.jit
def _input(x_ptr, nw_ptr, idx, m, K, inv, PRO: tl.constexpr):
    if PRO == 2:
        g = tl.load(x_ptr + idx, mask=m, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + K + idx, mask=m, other=0.0).to(tl.float32)
        v = g / (1.0 + tl.exp(-g)) * u
    else:
        v = tl.load(x_ptr + idx, mask=m, other=0.0).to(tl.float32)
        if PRO == 1:
            v = v * inv * tl.load(nw_ptr + idx, mask=m, other=0.0).to(tl.float32)
    return v


# (rows per program, columns — bytes for int4 — per step, warps). Decode shapes run from a few
# rows of long inputs (down_proj: 2048 rows x 8192) to thousands (lm_head: 32,000 rows), so the best tile
# differs per projection; the interpreter (CPU tests) takes the first only.
_CONFIGS = [(4, 128, 2), (4, 256, 4), (8, 128, 4), (8, 256, 4), (16, 128, 4), (16, 256, 8), (2, 512, 4), (32, 128, 8)]
MAX_INT4_GROUP = 2 * min(k for _, k, _ in _CONFIGS)  # a step covers whole groups
if os.environ.get("TRITON_INTERPRET") == "1":
    _CONFIGS = _CONFIGS[:1]


@triton.autotune(
    configs=[triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w) for n, k, w in _CONFIGS],
    key=["N", "K", "FMT", "PRO"],
)
@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    nw_ptr,
    res_ptr,
    out_ptr,
    N,
    K,
    EPS: tl.constexpr,
    FMT: tl.constexpr,
    G: tl.constexpr,
    PRO: tl.constexpr,
    HAS_RES: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    inv = 1.0
    if PRO == 1:
        ss = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            v = tl.load(x_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
            ss += v * v
        inv = 1.0 / tl.sqrt(tl.sum(ss, axis=0) / K + EPS)
    if FMT == 2:
        # BLOCK_K bytes of each row per step, i.e. 2 * BLOCK_K inputs (2j in the low nibble of byte j,
        # 2j + 1 in the high one) in NGB whole groups: one dot product per group, then one scale and
        # one minimum per group, loaded once.
        KH = K // 2
        NG = K // G
        NGB: tl.constexpr = 2 * BLOCK_K // G
        acc = tl.zeros([BLOCK_N, NGB], dtype=tl.float32)
        for k0 in range(0, KH, BLOCK_K):
            j = k0 + tl.arange(0, BLOCK_K)
            b = tl.load(w_ptr + rows[:, None] * KH + j[None, :], mask=rmask[:, None] & (j < KH)[None, :], other=0)
            w = tl.reshape(tl.join(b & 15, b >> 4), (BLOCK_N, NGB, G)).to(tl.float32)
            kk = 2 * k0 + tl.arange(0, 2 * BLOCK_K)
            xg = tl.reshape(_input(x_ptr, nw_ptr, kk, kk < K, K, inv, PRO), (NGB, G))
            dot = tl.sum(w * xg[None, :, :], axis=2)
            gi = 2 * k0 // G + tl.arange(0, NGB)
            gm = rmask[:, None] & (gi < NG)[None, :]
            sc = tl.load(s_ptr + rows[:, None] * NG + gi[None, :], mask=gm, other=0.0).to(tl.float32)
            zr = tl.load(z_ptr + rows[:, None] * NG + gi[None, :], mask=gm, other=0.0).to(tl.float32)
            acc += sc * dot + zr * tl.sum(xg, axis=1)[None, :]
        y = tl.sum(acc, axis=1)
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            km = kk < K
            w = tl.load(w_ptr + rows[:, None] * K + kk[None, :], mask=rmask[:, None] & km[None, :], other=0.0)
            xv = _input(x_ptr, nw_ptr, kk, km, K, inv, PRO)
            acc += w.to(tl.float32) * xv[None, :]
        y = tl.sum(acc, axis=1)
    if FMT == 1:
        y = y * tl.load(s_ptr + rows, mask=rmask, other=0.0)
    if HAS_RES:
        y += tl.load(res_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=rmask)


def gemv(
    x: torch.Tensor,
    w: torch.Tensor,
    n: int,
    fmt: int,
    out_dtype: torch.dtype,
    scale: torch.Tensor | None = None,
    zero: torch.Tensor | None = None,
    group: int = 0,
    prologue: int = NONE,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """out[n] = sum_k W[n, k] * f(x)[k] (+ residual[n]); K is x's length (half of it for SILU_MUL)."""
    k = x.numel() // 2 if prologue == SILU_MUL else x.numel()
    out = torch.empty(n, dtype=out_dtype, device=x.device)
    _gemv_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](
        x,
        w,
        scale if scale is not None else x,
        zero if zero is not None else x,
        norm_weight if norm_weight is not None else x,
        residual if residual is not None else x,
        out,
        n,
        k,
        EPS=eps,
        FMT=fmt,
        G=group or 1,
        PRO=prologue,
        HAS_RES=residual is not None,
    )
    return out


@triton.jit
def _attention_partial(
    q_ptr,
    k_ptr,
    v_ptr,
    pos_ptr,
    part_ptr,
    T,
    SCALE: tl.constexpr,
    GROUP: tl.constexpr,
    D: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """One query head x one block of positions: the block's max score, softmax mass and weighted V."""
    h = tl.program_id(0)
    blk = tl.program_id(1)
    base = (h // GROUP) * T * D
    pos = tl.load(pos_ptr)
    d = tl.arange(0, D)
    t = blk * BLOCK_T + tl.arange(0, BLOCK_T)
    valid = t <= pos
    q = tl.load(q_ptr + h * D + d).to(tl.float32) * SCALE
    kb = tl.load(k_ptr + base + t[:, None] * D + d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    s = tl.where(valid, tl.sum(kb * q[None, :], axis=1), float("-inf"))
    m = tl.max(s, axis=0)
    p = tl.where(valid, tl.exp(s - tl.where(m == float("-inf"), 0.0, m)), 0.0)
    vb = tl.load(v_ptr + base + t[:, None] * D + d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    out = part_ptr + (h * tl.num_programs(1) + blk) * (D + 2)
    tl.store(out + d, tl.sum(p[:, None] * vb, axis=0))
    tl.store(out + D, m)
    tl.store(out + D + 1, tl.sum(p, axis=0))


@triton.jit
def _attention_combine(part_ptr, out_ptr, NB: tl.constexpr, D: tl.constexpr):
    h = tl.program_id(0)
    b = tl.arange(0, NB)
    d = tl.arange(0, D)
    rows = part_ptr + (h * NB + b) * (D + 2)
    m = tl.load(rows + D)
    mass = tl.load(rows + D + 1)
    acc = tl.load(rows[:, None] + d[None, :])
    top = tl.max(m, axis=0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - top))
    out = tl.sum(w[:, None] * acc, axis=0) / tl.sum(w * mass, axis=0)
    tl.store(out_ptr + h * D + d, out.to(out_ptr.dtype.element_ty))


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """q: (heads, d); caches: (kv_heads, T, d); softmax over positions <= pos. Returns (heads * d,).

    Split over blocks of 64 positions (one program per head and block), then one program per head
    combines the blocks' partial softmaxes: 256 programs for 32 heads over 512 positions.
    """
    heads, d = q.shape
    kv_heads, t, _ = k_cache.shape
    block = min(64, t)
    blocks = t // block
    part = torch.empty(heads * blocks * (d + 2), dtype=torch.float32, device=q.device)
    out = torch.empty(heads * d, dtype=q.dtype, device=q.device)
    _attention_partial[(heads, blocks)](
        q, k_cache, v_cache, pos, part, t, SCALE=d**-0.5, GROUP=heads // kv_heads, D=d, BLOCK_T=block
    )
    _attention_combine[(heads,)](part, out, NB=blocks, D=d)
    return out
