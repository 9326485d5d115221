"""Triton kernels for one-token decode: a matrix-vector product over packed weights, and attention.

`gemv` reads a projection's packed bytes once (bf16 / fp32, int8 or fp8 with a per-row scale, int4
with an fp16 scale and minimum per group — the layouts `quantize.pack()` writes), dequantizes in
registers and accumulates in fp32. What surrounds a projection in a Llama block is fused into it, so
that a decoder layer runs five kernels: the RMSNorm of the input (each program accumulates the sum of
squares of the short input vector alongside the product and scales its rows by the inverse norm at
the end), SiLU(gate) * up as the epilogue of the fused gate/up product (each program computes a block
of gate rows and the matching up rows) or, when gate and up have different formats, as the prologue
of the down projection, and the residual add after the output and down projections. `attention`
applies the rotary embedding to the token's query and key and writes its key and value into the
static cache itself (no separate kernels for them), splits the cache into blocks of positions (one
program per query head and block, positions after `pos` masked), then combines the blocks' partial
softmaxes (flash-decoding).

The GEMV's tile (rows per program, inputs per step, warps, pipeline stages) is chosen per shape by
`gemv_config` from a table measured on the H200 (`bench/decode_gemv.py --sweep`), not by Triton's
autotuner, so that nothing is tuned inside a CUDA-graph capture.

int4 has three kernels. By default (`INT4_WORDS`) the decoder holds int4 weights as interleaved 32-bit
words (`decode.int4_words`: nibble i of word j of a group is the group's input i * G/8 + j) and
`_w4w_kernel` multiplies them: threads run along the inputs, each input is loaded once for all of a
thread's rows, and a nibble costs a shift (per pair), a LOP3 and an FFMA — about 4.2 SASS instructions
a weight (`bench/triton_sass.py`), 1.7-1.9 TB/s on the large Llama-1B products. `_gemv_kernel` also
takes quantize.pack()'s byte order (`W4_GROUP`): a [rows, groups, bytes] tile, nibbles made floats by
bit tricks, the input read contiguously and split into even and odd in registers (`INT4_XLOAD`);
about 7 instructions a weight, kept as the baseline and for `DECODE_INT4_WORDS=0`.
`_w4a8_kernel` (`W4A8_WORDS`, `PackedLinear(int8_inputs=True)`) takes the same words and rounds the
input to int8 per block of 32 (W4A8): a word's eight weights cost a shift, two LOP3 and two `dp4a`,
the sums are exact integers, about 1.5-2.1 instructions a weight and 2.2-2.8 TB/s on the large products.
An RMSNorm without a weight (`RMSNORM_UNIT`: a norm of ones) reads none.

Import needs Triton (on CUDA machines it comes with PyTorch). On a CPU the kernels run under
Triton's interpreter (`TRITON_INTERPRET=1`), which is how the unit tests check them without a GPU.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import triton
import triton.language as tl

# gemv weight layouts
W16, W8_ROW, W4_GROUP = 0, 1, 2
# int4 over interleaved 32-bit words (`decode.int4_words`, `_w4w_kernel`); the same bytes as W4_GROUP
W4_WORDS = 3
# the same words with the input rounded to int8 per block of 32 and multiplied by dp4a (`_w4a8_kernel`)
W4A8_WORDS = 4
# gemv prologues (RMSNORM without a norm weight runs as RMSNORM_UNIT: the weight was folded into the
# product's, `reparam.fold_rmsnorm_weights`, or is all ones, and is not read)
NONE, RMSNORM, SILU_MUL, RMSNORM_UNIT = 0, 1, 2, 3
# gemv epilogue: out[i] = silu(W[i] x) * (W[i + n] x) for the stacked gate/up weight (2n rows)
SILU_PAIR = 1
# int4 groups up to this size (a step of the kernel covers whole groups)
MAX_INT4_GROUP = 1024


@triton.jit
def _input(x_ptr, nw_ptr, idx, m, K, PRO: tl.constexpr):
    """The product's input at `idx` (before the RMSNorm's 1/rms, applied to the sums), and x^2."""
    if PRO == 3:  # an RMSNorm without weights (the norm's weight folded into the product's)
        v = tl.load(x_ptr + idx, mask=m, other=0.0).to(tl.float32)
        sq = v * v
    elif PRO == 2:
        g = tl.load(x_ptr + idx, mask=m, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + K + idx, mask=m, other=0.0).to(tl.float32)
        v = g / (1.0 + tl.exp(-g)) * u
        sq = v
    else:
        v = tl.load(x_ptr + idx, mask=m, other=0.0).to(tl.float32)
        sq = v
        if PRO == 1:
            sq = v * v
            v = v * tl.load(nw_ptr + idx, mask=m, other=0.0).to(tl.float32)
    return v, sq


@triton.jit
def _nibble_float(q):
    """int32 0..15 -> float32 without a (slow) int-to-float conversion: the bits 0x4B000000 | q are
    the float 2^23 + q, and subtracting 2^23 is exact."""
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _w4_load(w_ptr, rows64, rmask, stride_w, k0, NG, G: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """The int4 bytes of one step: a [rows, groups, G/2 bytes] tile from input k0 on."""
    HG: tl.constexpr = G // 2
    gi = k0 // G + tl.arange(0, BLOCK_K // G)
    boff = (gi[:, None] * HG + tl.arange(0, HG)[None, :])[None, :, :]
    if EVEN_K:
        q = tl.load(w_ptr + rows64[:, None, None] * stride_w + boff, mask=rmask[:, None, None], other=0)
    else:
        wm = rmask[:, None, None] & (gi < NG)[None, :, None]
        q = tl.load(w_ptr + rows64[:, None, None] * stride_w + boff, mask=wm, other=0)
    return q


@triton.jit
def _w4_step(
    acc, ss, q, k0, rows64, rmask, x_ptr, nw_ptr, s_ptr, z_ptr, K, NG,
    G: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PRO: tl.constexpr, XLOAD: tl.constexpr,
):
    """Adds one step's products: byte j of a group holds inputs 2j (low nibble) and 2j + 1 (high).
    One dot product per row and group, then its scale and minimum."""
    HG: tl.constexpr = G // 2
    gi = k0 // G + tl.arange(0, BLOCK_K // G)
    if EVEN_K:
        km = gi < NG + 1  # all true, constant along the tile
    else:
        km = gi < NG
    q = q.to(tl.int32)
    lo = _nibble_float(q & 15)
    hi = _nibble_float((q >> 4) & 15)
    if XLOAD == 0:
        # the even and odd inputs as two strided gathers
        ie = gi[:, None] * G + 2 * tl.arange(0, HG)[None, :]
        xe, se = _input(x_ptr, nw_ptr, ie, km[:, None], K, PRO)
        xo, so = _input(x_ptr, nw_ptr, ie + 1, km[:, None], K, PRO)
        if PRO == 1 or PRO == 3:
            ss += tl.sum(tl.sum(se + so, axis=1), axis=0)
        dot = tl.sum(lo * xe[None, :, :] + hi * xo[None, :, :], axis=2)
        xsum = tl.sum(xe + xo, axis=1)
    else:
        # the inputs as one contiguous [groups, G] load (vector loads), paired with the nibbles either
        # by splitting the inputs into even and odd (XLOAD 1) or by interleaving the nibbles (XLOAD 2)
        xi = gi[:, None] * G + tl.arange(0, G)[None, :]
        xv, sq = _input(x_ptr, nw_ptr, xi, km[:, None], K, PRO)
        if PRO == 1 or PRO == 3:
            ss += tl.sum(tl.sum(sq, axis=1), axis=0)
        if XLOAD == 1:
            xe, xo = tl.split(tl.reshape(xv, (BLOCK_K // G, HG, 2)))
            dot = tl.sum(lo * xe[None, :, :] + hi * xo[None, :, :], axis=2)
        else:
            w = tl.reshape(tl.join(lo, hi), (lo.shape[0], BLOCK_K // G, G))
            dot = tl.sum(w * xv[None, :, :], axis=2)
        xsum = tl.sum(xv, axis=1)
    gm = rmask[:, None] & km[None, :]
    sc = tl.load(s_ptr + rows64[:, None] * NG + gi[None, :], mask=gm, other=0.0).to(tl.float32)
    zr = tl.load(z_ptr + rows64[:, None] * NG + gi[None, :], mask=gm, other=0.0).to(tl.float32)
    acc += sc * dot + zr * xsum[None, :]
    return acc, ss


@triton.jit
def _wd_load(w_ptr, rows64, rmask, stride_w, k0, K, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """The 16- or 8-bit weights of one step: a [rows, BLOCK_K] tile from input k0 on."""
    kk = k0 + tl.arange(0, BLOCK_K)
    if EVEN_K:
        w = tl.load(w_ptr + rows64[:, None] * stride_w + kk[None, :], mask=rmask[:, None], other=0.0)
    else:
        wm = rmask[:, None] & (kk < K)[None, :]
        w = tl.load(w_ptr + rows64[:, None] * stride_w + kk[None, :], mask=wm, other=0.0)
    return w


@triton.jit
def _wd_step(acc, ss, w, k0, x_ptr, nw_ptr, K, BLOCK_K: tl.constexpr, PRO: tl.constexpr):
    kk = k0 + tl.arange(0, BLOCK_K)
    xv, sq = _input(x_ptr, nw_ptr, kk, kk < K, K, PRO)
    if PRO == 1 or PRO == 3:
        ss += tl.sum(sq, axis=0)
    acc += w.to(tl.float32) * xv[None, :]
    return acc, ss


@triton.jit
def _weight_rows(N, BLOCK_N: tl.constexpr, EPI: tl.constexpr):
    """This program's weight rows and their mask: BLOCK_N rows, or with EPI == SILU_PAIR 2 BLOCK_N rows
    interleaved (2i is gate row n0 + i, 2i + 1 is up row N + n0 + i)."""
    if EPI == 1:
        r = tl.arange(0, 2 * BLOCK_N)
        rows = tl.program_id(0) * BLOCK_N + r // 2 + (r % 2) * N
        rmask = (tl.program_id(0) * BLOCK_N + r // 2) < N
    else:
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
    return rows, rmask


@triton.jit
def _store_outputs(y, ss, res_ptr, out_ptr, N, K, EPS: tl.constexpr, PRO: tl.constexpr, EPI: tl.constexpr,
                   HAS_RES: tl.constexpr, BLOCK_N: tl.constexpr):
    """The row sums y to outputs: the RMSNorm's 1 / rms (ss: the input's sum of squares), SiLU(gate) * up
    (the gate and up sums rounded to the output type first, as if stored), the residual, the store."""
    if PRO == 1 or PRO == 3:
        y = y / tl.sqrt(ss / K + EPS)
    if EPI == 1:
        y = y.to(out_ptr.dtype.element_ty).to(tl.float32)
        g, u = tl.split(tl.reshape(y, (BLOCK_N, 2)))
        y = g / (1.0 + tl.exp(-g)) * u
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    if HAS_RES:
        y += tl.load(res_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=rmask)


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
    stride_w,
    EPS: tl.constexpr,
    FMT: tl.constexpr,
    G: tl.constexpr,
    PRO: tl.constexpr,
    EPI: tl.constexpr,
    HAS_RES: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
    XLOAD: tl.constexpr,
):
    """N outputs; the weight has N rows (2N with EPI == SILU_PAIR: gate rows, then up rows).

    With PDL (programmatic dependent launch) the kernel loads its first weight tile before it waits
    for the previous kernel to finish: the weights are not what the previous kernel writes, only the
    input and the residual are. It lets the next kernel start at once (PDL == 1) or once its own
    products are done (PDL == 2)."""
    if PDL == 1:
        tl.extra.cuda.gdc_launch_dependents()
    rows, rmask = _weight_rows(N, BLOCK_N, EPI)
    R: tl.constexpr = BLOCK_N * (1 + EPI)
    rows64 = rows.to(tl.int64)
    ss = tl.full((), 0.0, tl.float32)
    if FMT == 2:
        NG = K // G
        acc = tl.zeros([R, BLOCK_K // G], dtype=tl.float32)
        q = _w4_load(w_ptr, rows64, rmask, stride_w, 0, NG, G, BLOCK_K, EVEN_K)
        if PDL != 0:
            tl.extra.cuda.gdc_wait()
        acc, ss = _w4_step(
            acc, ss, q, 0, rows64, rmask, x_ptr, nw_ptr, s_ptr, z_ptr, K, NG, G, BLOCK_K, EVEN_K, PRO, XLOAD
        )
        for k0 in range(BLOCK_K, K, BLOCK_K):
            q = _w4_load(w_ptr, rows64, rmask, stride_w, k0, NG, G, BLOCK_K, EVEN_K)
            acc, ss = _w4_step(
                acc, ss, q, k0, rows64, rmask, x_ptr, nw_ptr, s_ptr, z_ptr, K, NG, G, BLOCK_K, EVEN_K, PRO, XLOAD
            )
        y = tl.sum(acc, axis=1)
    else:
        acc = tl.zeros([R, BLOCK_K], dtype=tl.float32)
        w = _wd_load(w_ptr, rows64, rmask, stride_w, 0, K, BLOCK_K, EVEN_K)
        if PDL != 0:
            tl.extra.cuda.gdc_wait()
        acc, ss = _wd_step(acc, ss, w, 0, x_ptr, nw_ptr, K, BLOCK_K, PRO)
        for k0 in range(BLOCK_K, K, BLOCK_K):
            w = _wd_load(w_ptr, rows64, rmask, stride_w, k0, K, BLOCK_K, EVEN_K)
            acc, ss = _wd_step(acc, ss, w, k0, x_ptr, nw_ptr, K, BLOCK_K, PRO)
        y = tl.sum(acc, axis=1)
    if PDL == 2:
        tl.extra.cuda.gdc_launch_dependents()
    if FMT == 1:
        y = y * tl.load(s_ptr + rows, mask=rmask, other=0.0)
    _store_outputs(y, ss, res_ptr, out_ptr, N, K, EPS, PRO, EPI, HAS_RES, BLOCK_N)


@triton.jit
def _word_nibble(w, magic, NIB: tl.constexpr):
    """Nibble NIB (bits 4 NIB .. 4 NIB + 3) of each int32 word as the float 256 + q (NIB even: the nibble
    moved to bits 15-18 of an fp32 256.0) or 16 + q (NIB odd: bits 19-22 of a 16.0): one shift per pair of
    nibbles (the caller's CSE keeps one), then one LOP3 that masks and ORs the exponent (`magic` is the
    runtime 0x43800000 or 0x41800000 so that the mask and the OR stay one instruction)."""
    S: tl.constexpr = 15 - 8 * (NIB // 2)
    if S >= 0:
        t = w << S
    else:
        t = w >> (-S)
    P: tl.constexpr = 15 + 4 * (NIB % 2)
    return ((t & (15 << P)) | magic).to(tl.float32, bitcast=True)


@triton.jit
def _w4w_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    nw_ptr,
    res_ptr,
    out_ptr,
    N,
    K,
    stride_w,
    magic_even,
    magic_odd,
    EPS: tl.constexpr,
    G: tl.constexpr,
    PRO: tl.constexpr,
    EPI: tl.constexpr,
    HAS_RES: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):
    """The int4 product over interleaved words (`decode.int4_words`): word j of a group holds the group's
    inputs j, j + G/8, ..., j + 7 G/8 in its nibbles 0..7, so one contiguous load of G/8 inputs feeds
    one nibble of G/8 words, and each thread runs along the inputs (its inputs loaded once for all its
    rows). A nibble q becomes the float f = 2^P + q (P = 8 for even nibbles, 4 for odd: the exponent of
    the magic OR-ed in), so sum x w = sum_g s_g (sum x f - 256 E_g - 16 O_g) + z_g (E_g + O_g), with E_g and
    O_g the sums of the group's inputs under even and odd nibbles: per weight a LOP3 and an FFMA (and a
    shift per pair), per input one add, per 4 words the scale and the minimum; about 4.2 SASS
    instructions a weight against 7-9 for the byte kernel (bench/triton_sass.py). The next step's words load
    while this step is summed; the RMSNorm's squares accumulate per input and are reduced once. K must be a
    multiple of BLOCK_K."""
    GW: tl.constexpr = G // 8
    BKW: tl.constexpr = BLOCK_K // 8
    if PDL == 1:
        tl.extra.cuda.gdc_launch_dependents()
    rows, rmask = _weight_rows(N, BLOCK_N, EPI)
    R: tl.constexpr = BLOCK_N * (1 + EPI)
    rows64 = rows.to(tl.int64)
    NG = K // G
    jw = tl.arange(0, BKW)
    j4 = tl.arange(0, BKW // 4)
    wptr = w_ptr + rows64[:, None] * stride_w + jw[None, :]
    xoff = (jw // GW) * G + jw % GW  # nibble 0's input of each word of the step
    acc = tl.zeros([R, BKW // 4], dtype=tl.float32)
    sqacc = tl.zeros([BKW], dtype=tl.float32)
    w = tl.load(wptr, mask=rmask[:, None], other=0)
    if PDL != 0:
        tl.extra.cuda.gdc_wait()
    for k0 in range(0, K, BLOCK_K):
        # the next step's words are loaded before this step's sums (in flight meanwhile)
        w_next = tl.load(wptr + (k0 + BLOCK_K) // 8, mask=rmask[:, None] & (k0 + BLOCK_K < K), other=0)
        cidx = rows64[:, None] * NG + (k0 // G + j4 // (GW // 4))[None, :]  # the group of each 4 words
        sc = tl.load(s_ptr + cidx, mask=rmask[:, None], other=0.0).to(tl.float32)
        zc = tl.load(z_ptr + cidx, mask=rmask[:, None], other=0.0).to(tl.float32)
        part = tl.zeros([R, BKW], dtype=tl.float32)
        even = tl.zeros([BKW], dtype=tl.float32)
        odd = tl.zeros([BKW], dtype=tl.float32)
        for i in tl.static_range(8):
            xi, sq = _input(x_ptr, nw_ptr, k0 + xoff + i * GW, xoff < K, K, PRO)
            if i % 2 == 0:
                part += xi[None, :] * _word_nibble(w, magic_even, i)
                even += xi
            else:
                part += xi[None, :] * _word_nibble(w, magic_odd, i)
                odd += xi
            if PRO == 1 or PRO == 3:
                sqacc += sq
        p4 = tl.sum(tl.reshape(part, (R, BKW // 4, 4)), axis=2)
        e4 = tl.sum(tl.reshape(even, (BKW // 4, 4)), axis=1)
        o4 = tl.sum(tl.reshape(odd, (BKW // 4, 4)), axis=1)
        acc += sc * (p4 - (256.0 * e4 + 16.0 * o4)[None, :]) + zc * (e4 + o4)[None, :]
        w = w_next
    y = tl.sum(acc, axis=1)
    if PDL == 2:
        tl.extra.cuda.gdc_launch_dependents()
    ss = tl.sum(sqacc, axis=0)
    _store_outputs(y, ss, res_ptr, out_ptr, N, K, EPS, PRO, EPI, HAS_RES, BLOCK_N)


@triton.jit
def _dp4a(a, b, c, ASM: tl.constexpr):
    """c + the dot product of a's four unsigned bytes with b's four signed bytes (int32 tensors): one
    `dp4a.u32.s32` on the GPU, the same sum written out under Triton's interpreter (no inline assembly)."""
    if ASM:
        return tl.inline_asm_elementwise(
            "dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32, is_pure=True, pack=1
        )
    else:
        for i in tl.static_range(4):
            c += ((a >> (8 * i)) & 255) * ((b << (24 - 8 * i)) >> 24)  # unsigned byte x signed byte
        return c


@triton.jit
def _bytes4(a, b, c, d, inv, ASM: tl.constexpr):
    """The int32 whose bytes 0..3 are round(a * inv), ..., round(d * inv) (each within +-127), two's
    complement: adding 1.5 * 2^23 rounds a float to an integer (to nearest even, as torch.round) held in
    its low bits, and three PRMTs gather the four low bytes."""
    ra = (a * inv + 12582912.0).to(tl.int32, bitcast=True)
    rb = (b * inv + 12582912.0).to(tl.int32, bitcast=True)
    rc = (c * inv + 12582912.0).to(tl.int32, bitcast=True)
    rd = (d * inv + 12582912.0).to(tl.int32, bitcast=True)
    if ASM:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 lo, hi; prmt.b32 lo, $1, $2, 0x0040; prmt.b32 hi, $3, $4, 0x0040;"
            " prmt.b32 $0, lo, hi, 0x5410; }",
            "=r,r,r,r,r", [ra, rb, rc, rd], dtype=tl.int32, is_pure=True, pack=1,
        )
    else:
        return (ra & 255) | ((rb & 255) << 8) | ((rc & 255) << 16) | (rd << 24)


@triton.jit
def _w4a8_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    nw_ptr,
    res_ptr,
    out_ptr,
    N,
    K,
    stride_w,
    EPS: tl.constexpr,
    G: tl.constexpr,
    PRO: tl.constexpr,
    EPI: tl.constexpr,
    HAS_RES: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
    ASM: tl.constexpr,
    ONE_STEP: tl.constexpr = False,
):
    """The int4 product over interleaved words (`decode.int4_words`, as `_w4w_kernel`) with its input rounded
    to int8 (W4A8) and multiplied on the integer units: `dp4a` takes four weight nibbles (word & 0x0F0F0F0F
    holds nibbles 0, 2, 4, 6 as bytes; (word >> 4) & 0x0F0F0F0F nibbles 1, 3, 5, 7) and the four int8 inputs
    under them, so a word costs a shift, two LOP3 and two dp4a (eight weights), and the sum is exact.

    The input is rounded per block of 32: the inputs under 4 consecutive words of a group (the group's
    inputs i * G/8 + 4c + d, i = 0..7, d = 0..3, for block c), symmetrically to its largest magnitude over
    127 (`decode.int8_input_blocks` computes the same in torch). Where a thread holds 4 words of a row
    (most tiles) it holds whole blocks and the scale needs no exchange between threads; with fewer (e.g.
    16 rows x 512 inputs on one warp) the block maximum is reduced across threads (shuffles).
    Per block and row: s (scale_x sum q xq) + z scale_x
    sum xq, with the weight s q + z. The RMSNorm's 1 / rms (of the unrounded input) applies to the sums,
    as in `_w4w_kernel`, so the rounding sees the input times the norm's weight (if it has one).

    Rows past N and the step after the last are read from valid rows and steps (clamped, not masked), so
    that no load needs a predicate and a zeroed destination; with ONE_STEP (K == BLOCK_K) nothing is
    loaded ahead. K must be a multiple of BLOCK_K. PDL == 3 lets the next kernel launch once the input is
    there (after the wait), for bench/pdl_trigger_a8_ab.py."""
    GW: tl.constexpr = G // 8
    BKW: tl.constexpr = BLOCK_K // 8
    NB: tl.constexpr = BKW // 4
    if PDL == 1:
        tl.extra.cuda.gdc_launch_dependents()
    rows, rmask = _weight_rows(N, BLOCK_N, EPI)
    R: tl.constexpr = BLOCK_N * (1 + EPI)
    rows64 = tl.where(rmask, rows, 0).to(tl.int64)  # rows past N read row 0; their sums are not stored
    NG = K // G
    jw = tl.arange(0, BKW)
    j4 = tl.arange(0, NB)
    wptr = w_ptr + rows64[:, None] * stride_w + jw[None, :]
    xoff = (jw // GW) * G + jw % GW  # nibble 0's input of each word of the step
    acc = tl.zeros([R, NB], dtype=tl.float32)
    sqacc = tl.zeros([BKW], dtype=tl.float32)
    w = tl.load(wptr)
    if PDL != 0:
        tl.extra.cuda.gdc_wait()
    if PDL == 3:  # once the input is there: the next kernel launches while this one computes
        tl.extra.cuda.gdc_launch_dependents()
    for k0 in range(0, K, BLOCK_K):
        if ONE_STEP:  # K == BLOCK_K: nothing to load ahead
            w_next = w
        else:
            w_next = tl.load(wptr + tl.minimum(k0 + BLOCK_K, K - BLOCK_K) // 8)  # the last step reloads itself
        cidx = rows64[:, None] * NG + (k0 // G + j4 // (GW // 4))[None, :]  # the group of each block
        sc = tl.load(s_ptr + cidx).to(tl.float32)
        zc = tl.load(z_ptr + cidx).to(tl.float32)
        x0, q0 = _input(x_ptr, nw_ptr, k0 + xoff, jw < BKW, K, PRO)
        x1, q1 = _input(x_ptr, nw_ptr, k0 + xoff + GW, jw < BKW, K, PRO)
        x2, q2 = _input(x_ptr, nw_ptr, k0 + xoff + 2 * GW, jw < BKW, K, PRO)
        x3, q3 = _input(x_ptr, nw_ptr, k0 + xoff + 3 * GW, jw < BKW, K, PRO)
        x4, q4 = _input(x_ptr, nw_ptr, k0 + xoff + 4 * GW, jw < BKW, K, PRO)
        x5, q5 = _input(x_ptr, nw_ptr, k0 + xoff + 5 * GW, jw < BKW, K, PRO)
        x6, q6 = _input(x_ptr, nw_ptr, k0 + xoff + 6 * GW, jw < BKW, K, PRO)
        x7, q7 = _input(x_ptr, nw_ptr, k0 + xoff + 7 * GW, jw < BKW, K, PRO)
        if PRO == 1 or PRO == 3:  # one chain, so that each square is an FFMA
            sqacc += q0
            sqacc += q1
            sqacc += q2
            sqacc += q3
            sqacc += q4
            sqacc += q5
            sqacc += q6
            sqacc += q7
        big = tl.maximum(
            tl.maximum(tl.maximum(tl.abs(x0), tl.abs(x1)), tl.maximum(tl.abs(x2), tl.abs(x3))),
            tl.maximum(tl.maximum(tl.abs(x4), tl.abs(x5)), tl.maximum(tl.abs(x6), tl.abs(x7))),
        )
        amax = tl.maximum(tl.max(tl.reshape(big, (NB, 4)), axis=1), 1e-30)  # per block of 32 inputs
        inv4 = 127.0 / amax
        inv = tl.reshape(tl.broadcast_to(inv4[:, None], (NB, 4)), (BKW,))
        # the int8 inputs under the even nibbles (0, 2, 4, 6) and the odd ones, as bytes of one word each
        xa = _bytes4(x0, x2, x4, x6, inv, ASM)
        xb = _bytes4(x1, x3, x5, x7, inv, ASM)
        ones = tl.full([BKW], 0x01010101, tl.int32)
        xs = _dp4a(ones, xb, _dp4a(ones, xa, tl.zeros([BKW], dtype=tl.int32), ASM), ASM)  # sum of xq
        lo = w & 0x0F0F0F0F
        hi = (w >> 4) & 0x0F0F0F0F
        d = _dp4a(hi, xb[None, :], _dp4a(lo, xa[None, :], tl.zeros([R, BKW], dtype=tl.int32), ASM), ASM)
        p4 = tl.sum(tl.reshape(d, (R, NB, 4)), axis=2).to(tl.float32)
        xs4 = tl.sum(tl.reshape(xs, (NB, 4)), axis=1).to(tl.float32)
        scale_x = amax / 127.0
        acc += (sc * scale_x[None, :]) * p4 + zc * (scale_x * xs4)[None, :]
        w = w_next
    y = tl.sum(acc, axis=1)
    if PDL == 2:
        tl.extra.cuda.gdc_launch_dependents()
    ss = tl.sum(sqacc, axis=0)
    _store_outputs(y, ss, res_ptr, out_ptr, N, K, EPS, PRO, EPI, HAS_RES, BLOCK_N)


# Tiles measured on the H200 (bench/decode_gemv.py --sweep, decode-gemv-sweep-2026-11-29-h200.json)
# per (format, outputs, inputs, epilogue): (rows per program, inputs per step, warps, stages[, int4 input load]).
TUNED: dict[tuple[int, int, int, int], tuple[int, ...]] = {
    # int4: a fifth element, how the input is read (INT4_XLOAD), from decode-gemv-sweep-2026-11-29-h200-int4-xload.json
    (W4_GROUP, 3072, 2048, 0): (8, 1024, 8, 3, 1),
    (W4_GROUP, 2048, 2048, 0): (4, 2048, 8, 3, 2),
    (W4_GROUP, 8192, 2048, SILU_PAIR): (32, 512, 8, 3, 1),
    (W4_GROUP, 2048, 8192, 0): (4, 2048, 8, 3, 2),
    (W4_GROUP, 32000, 2048, 0): (16, 512, 4, 3, 1),
    # int4 words: decode-gemv-grid-2026-11-29-h200-int4-words.json (stages do not apply); the step with
    # these tiles 0.515 ms against 0.535 with the sweep's (…-sweep-…-int4-words.json), same session; the
    # down projection's 4096 inputs a step from a wider grid (…-grid-…-int4-words-wide-steps.json): 8.47 ->
    # 6.97 us, step 0.512 -> 0.488 ms
    (W4_WORDS, 3072, 2048, 0): (4, 2048, 2, 1),
    (W4_WORDS, 2048, 2048, 0): (8, 2048, 2, 1),
    (W4_WORDS, 8192, 2048, SILU_PAIR): (4, 1024, 1, 1),
    (W4_WORDS, 2048, 8192, 0): (4, 4096, 4, 1),
    (W4_WORDS, 32000, 2048, 0): (8, 1024, 1, 1),
    # W4A8 (int8 inputs, dp4a): decode-gemv-sweep-2026-11-30-h200-int4-a8.json (qkv 3.84, o 3.38, gate/up
    # 8.25, down 6.08, lm_head 12.39 us against 4.21, 3.81, 10.69, 7.92, 18.89 for the word kernel there)
    (W4A8_WORDS, 3072, 2048, 0): (8, 2048, 2, 1),
    (W4A8_WORDS, 2048, 2048, 0): (8, 2048, 2, 1),
    (W4A8_WORDS, 8192, 2048, SILU_PAIR): (8, 1024, 1, 1),
    (W4A8_WORDS, 2048, 8192, 0): (4, 4096, 4, 1),
    (W4A8_WORDS, 32000, 2048, 0): (16, 512, 1, 1),
    (W8_ROW, 3072, 2048, 0): (4, 1024, 4, 3),
    (W8_ROW, 2048, 2048, 0): (2, 2048, 4, 1),
    (W8_ROW, 8192, 2048, SILU_PAIR): (4, 1024, 4, 3),
    (W8_ROW, 2048, 8192, 0): (2, 2048, 4, 1),
    (W8_ROW, 32000, 2048, 0): (16, 512, 4, 3),
    (W16, 3072, 2048, 0): (8, 512, 4, 3),
    (W16, 2048, 2048, 0): (2, 1024, 4, 3),
    (W16, 8192, 2048, SILU_PAIR): (4, 1024, 4, 3),
    (W16, 2048, 8192, 0): (2, 1024, 4, 3),
    (W16, 32000, 2048, 0): (8, 512, 4, 3),
}
if os.environ.get("DECODE_GEMV_TUNED"):  # a sweep's "best" list (bench/decode_gemv.py --sweep), to try it out
    for _b in json.loads(Path(os.environ["DECODE_GEMV_TUNED"]).read_text()).get("best", []):
        TUNED[_b["fmt"], _b["n"], _b["k"], _b["epi"]] = tuple(_b["config"])


def pdl_supported() -> bool:
    """Programmatic dependent launch: Hopper or newer, and a Triton that can launch with it."""
    return (
        torch.cuda.is_available()
        and torch.cuda.get_device_capability()[0] >= 9
        and hasattr(tl.extra.cuda, "gdc_wait")
        and os.environ.get("TRITON_INTERPRET") != "1"
    )


# With PDL, when a product lets the next kernel launch, per weight format: 1 at its start (the next
# kernel's programs wait on the GPU beside it), 2 once its products are summed, 3 (W4A8 only) once its
# input is there. Measured on the H200 (Llama-1B step, bench/llama_decode_profile.py --raw-graph): bf16
# 0.77 ms a token without PDL, 0.71 starting early, 0.73 late; int4 bytes 0.81 without, 1.04 early,
# 0.78 late. W4A8 (bench/pdl_trigger_a8_ab.py, alternated in one run): 0.439 ms late, 0.405 early, 0.421
# once the input is there.
PDL_TRIGGER = {W16: 1, W8_ROW: 1, W4_GROUP: 2, W4_WORDS: 2, W4A8_WORDS: 1}


# How an int4 product reads its input (`_w4_step`): 0 as two strided gathers of the even and odd
# inputs, 1 as one contiguous (vectorized) load split into even and odd in registers, 2 the same load
# against the two nibbles interleaved. A tile's optional fifth element overrides it. On the H200 the
# contiguous load made the int4 products 0-30 % faster (down 13.1 -> 9.3 us, Q/K/V 6.5 -> 4.8) and the
# Llama-1B step 0.74 -> 0.64 ms; 1 and 2 are within noise of each other.
INT4_XLOAD = int(os.environ.get("DECODE_INT4_XLOAD", "1"))

# Whether the triton backend's int4 products (over words) round their input to int8 per block of 32 and
# multiply with dp4a (`_w4a8_kernel`, W4A8) by default; `DecodeLlama(int8_inputs=...)` chooses per model.
INT4_INT8_INPUTS = os.environ.get("DECODE_INT4_INT8_INPUTS", "0") == "1"

# Whether the triton backend holds int4 weights as interleaved words (`decode.int4_words`, `_w4w_kernel`)
# rather than in quantize.pack()'s byte order (`_gemv_kernel`).
INT4_WORDS = os.environ.get("DECODE_INT4_WORDS", "1") == "1"


# W4A8 products whose inputs fit in one step (K == BLOCK_K) do not load a next step ahead
A8_ONE_STEP = os.environ.get("DECODE_A8_ONE_STEP", "1") == "1"


def _launch(pdl: bool) -> dict:
    # only passed when used: a Triton without the option would take it for a kernel argument
    return {"launch_pdl": True} if pdl else {}


def _default_config(fmt: int, n: int, k: int, epi: int) -> tuple[int, ...]:
    if fmt in (W4_WORDS, W4A8_WORDS):
        return (8, 2048, 2, 1)
    return (8, 1024, 4, 3) if fmt == W4_GROUP else (4, 1024, 4, 3)


def gemv_config(fmt: int, n: int, k: int, epi: int = 0) -> tuple[int, ...]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages[, int4 input load]) for an n-output, k-input product."""
    return TUNED.get((fmt, n, k, epi)) or _default_config(fmt, n, k, epi)


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
    epilogue: int = 0,
    config: tuple[int, ...] | None = None,
    pdl: bool = False,
) -> torch.Tensor:
    """out[n] = sum_k W[n, k] * f(x)[k] (+ residual[n]); K is x's length (half of it for SILU_MUL).

    With epilogue=SILU_PAIR, W has 2n rows and out[i] = silu(W[i] f(x)) * W[n + i] f(x).
    pdl: launch with programmatic dependent launch (`pdl_supported()`; see `_gemv_kernel`)."""
    k = x.numel() // 2 if prologue == SILU_MUL else x.numel()
    if prologue == RMSNORM and norm_weight is None:
        prologue = RMSNORM_UNIT
    bn, bk, warps, stages, *rest = config or gemv_config(fmt, n, k, epilogue)
    if fmt in (W4_WORDS, W4A8_WORDS):
        bk = min(bk, triton.next_power_of_2(k))
        while bk > group and k % bk:
            bk //= 2
        if k % bk or bk % group:
            raise ValueError(f"int4 words: {k} inputs in steps of whole groups of {group}")
    else:
        bk = max(min(bk, triton.next_power_of_2(k)), group if fmt == W4_GROUP else 1)
    out = torch.empty(n, dtype=out_dtype, device=x.device)
    args = (
        x,
        w,
        scale if scale is not None else x,
        zero if zero is not None else x,
        norm_weight if norm_weight is not None else x,
        residual if residual is not None else x,
        out,
        n,
        k,
    )
    common = dict(
        EPS=eps,
        G=group or 1,
        PRO=prologue,
        EPI=epilogue,
        HAS_RES=residual is not None,
        BLOCK_N=bn,
        BLOCK_K=bk,
        PDL=PDL_TRIGGER[fmt] if pdl else 0,
        num_warps=warps,
        num_stages=stages,
        **_launch(pdl),
    )
    grid = (triton.cdiv(n, bn),)
    if fmt in (W4_WORDS, W4A8_WORDS) and rest and rest[0]:
        common["maxnreg"] = rest[0]  # a words tile's fifth element caps the registers per thread
    if fmt == W4_WORDS:
        # stride in words; the exponent OR-ed into each nibble, as a runtime value (see _word_nibble)
        _w4w_kernel[grid](*args, k // 8, 0x43800000, 0x41800000, **common)
    elif fmt == W4A8_WORDS:
        _w4a8_kernel[grid](*args, k // 8, ASM=os.environ.get("TRITON_INTERPRET") != "1",
                           ONE_STEP=A8_ONE_STEP and k == bk, **common)
    else:
        xload = rest[0] if rest else INT4_XLOAD
        stride = k // 2 if fmt == W4_GROUP else k
        _gemv_kernel[grid](
            *args, stride, FMT=fmt, EVEN_K=k % bk == 0, XLOAD=xload if fmt == W4_GROUP else 0, **common
        )
    return out


@triton.jit
def _rope(ptr, c, s, d, D: tl.constexpr):
    """x * cos + rotate_half(x) * sin for one head at ptr, rounded to the cache's type as torch does."""
    dt = ptr.dtype.element_ty
    x = tl.load(ptr + d).to(tl.float32)
    rot = tl.load(ptr + (d + D // 2) % D).to(tl.float32)
    rot = tl.where(d < D // 2, -rot, rot)
    a = (x * c).to(dt).to(tl.float32)
    b = (rot * s).to(dt).to(tl.float32)
    return (a + b).to(dt)


@triton.jit
def _attention_partial(
    qkv_ptr,
    k_ptr,
    v_ptr,
    cos_ptr,
    sin_ptr,
    pos_ptr,
    part_ptr,
    T,
    SCALE: tl.constexpr,
    HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    D: tl.constexpr,
    BLOCK_T: tl.constexpr,
    PDL: tl.constexpr,
):
    """One query head x one block of positions: the block's max score, softmax mass and weighted V.

    The token's query and key get the rotary embedding here; its key and value stand in for the
    cache's row `pos`, which the block holding `pos` writes (once per key/value head). With PDL the
    cache rows before `pos` (written by earlier steps) and the rotary tables are read before waiting for
    the previous kernel, which writes the token's projections."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    h = tl.program_id(0)
    blk = tl.program_id(1)
    kvh = h // GROUP
    base = kvh * T * D
    pos = tl.load(pos_ptr)
    d = tl.arange(0, D)
    t = blk * BLOCK_T + tl.arange(0, BLOCK_T)
    old = t < pos
    kb = tl.load(k_ptr + base + t[:, None] * D + d[None, :], mask=old[:, None], other=0.0).to(tl.float32)
    vb = tl.load(v_ptr + base + t[:, None] * D + d[None, :], mask=old[:, None], other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + pos * D + d).to(tl.float32)
    sn = tl.load(sin_ptr + pos * D + d).to(tl.float32)
    if PDL:
        tl.extra.cuda.gdc_wait()
    q = _rope(qkv_ptr + h * D, c, sn, d, D).to(tl.float32) * SCALE
    k_new = _rope(qkv_ptr + (HEADS + kvh) * D, c, sn, d, D)
    v_new = tl.load(qkv_ptr + (HEADS + HEADS // GROUP + kvh) * D + d)
    mine = (tl.full([D], blk, tl.int32) == pos // BLOCK_T) & (tl.full([D], h % GROUP, tl.int32) == 0)
    tl.store(k_ptr + base + pos * D + d, k_new.to(k_ptr.dtype.element_ty), mask=mine)
    tl.store(v_ptr + base + pos * D + d, v_new.to(v_ptr.dtype.element_ty), mask=mine)
    now = (t == pos)[:, None]
    valid = t <= pos
    kb = tl.where(now, k_new.to(tl.float32)[None, :], kb)
    s = tl.where(valid, tl.sum(kb * q[None, :], axis=1), float("-inf"))
    m = tl.max(s, axis=0)
    p = tl.where(valid, tl.exp(s - tl.where(m == float("-inf"), 0.0, m)), 0.0)
    vb = tl.where(now, v_new.to(tl.float32)[None, :], vb)
    out = part_ptr + (h * tl.num_programs(1) + blk) * (D + 2)
    tl.store(out + d, tl.sum(p[:, None] * vb, axis=0))
    tl.store(out + D, m)
    tl.store(out + D + 1, tl.sum(p, axis=0))


@triton.jit
def _attention_combine(part_ptr, out_ptr, NB: tl.constexpr, D: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
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


def attention(
    qkv: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pos: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    heads: int,
    pdl: bool = False,
) -> torch.Tensor:
    """qkv: the token's (heads + 2 kv_heads) * d projections, before the rotary embedding; caches:
    (kv_heads, T, d); cos, sin: (T, d) tables. Applies the rotary embedding to q and k, writes k and
    v into the caches at `pos`, and returns softmax(q K^T / sqrt(d)) V over positions <= pos,
    (heads * d,).

    Split over blocks of 64 positions (one program per head and block), then one program per head
    combines the blocks' partial softmaxes: 256 programs for 32 heads over 512 positions.
    """
    kv_heads, t, d = k_cache.shape
    block = min(64, t)
    blocks = t // block
    part = torch.empty(heads * blocks * (d + 2), dtype=torch.float32, device=qkv.device)
    out = torch.empty(heads * d, dtype=qkv.dtype, device=qkv.device)
    _attention_partial[(heads, blocks)](
        qkv, k_cache, v_cache, cos, sin, pos, part, t,
        SCALE=d**-0.5, HEADS=heads, GROUP=heads // kv_heads, D=d, BLOCK_T=block, PDL=pdl, **_launch(pdl),
    )
    _attention_combine[(heads,)](part, out, NB=blocks, D=d, PDL=pdl, **_launch(pdl))
    return out
