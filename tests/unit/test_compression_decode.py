"""DecodeLlama: one-token decode from packed weights computes what the Llama computes (CPU, fp32)."""

import copy

import pytest
import torch

from workers.compression.decode import (
    DecodeError,
    DecodeLlama,
    PackedEmbedding,
    PackedLinear,
    int4_bytes,
    int4_words,
)
from workers.compression.models import _build_llama
from workers.compression.quantize import apply_simulated, estimate_bytes, fake_quant, quantizable_layers

FORMATS = ["int4_g32", "int8", "fp8_e4m3", "bf16"]


@pytest.fixture(scope="module")
def lm():
    return _build_llama(False, smoke=True).lm.float().eval()


def tokens(n=7, seed=0):
    return torch.randint(0, 1024, (1, n), generator=torch.Generator().manual_seed(seed))


def decode_all(dec, ids):
    with torch.no_grad():
        return torch.stack([dec(ids[0, i : i + 1], torch.tensor([i])) for i in range(ids.shape[1])])


@pytest.mark.parametrize("fmt", FORMATS)
def test_packed_linear_multiplies_by_exactly_the_fake_quantized_weight(fmt):
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(1))
    layer = PackedLinear(w, fmt, torch.float32)
    torch.testing.assert_close(layer.dequantized(), fake_quant(w, fmt), atol=1e-5, rtol=1e-5)
    x = torch.randn(128, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(layer(x), fake_quant(w, fmt) @ x, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_words_hold_each_groups_inputs_interleaved_and_convert_back(group):
    """The triton word kernel's layout: nibble i of word j of a group is the group's input i * G/8 + j."""
    torch.manual_seed(group)
    rows, k = 6, 4 * group
    q = PackedLinear(torch.randn(rows, k), f"int4_g{group}", torch.float32).q
    codes = torch.stack([q & 15, q >> 4], dim=-1).reshape(rows, k)  # input order
    words = int4_words(q, group)
    assert words.dtype == torch.int32
    assert words.shape == (rows, k // 8)
    assert words.numel() * 4 == q.numel()  # the same bytes
    gw = group // 8
    for r, j, i in [(0, 0, 0), (1, 3, 7), (5, gw - 1, 4), (2, gw + 1, 1), (3, 3 * gw + 2, 6)]:
        g = j // gw
        nibble = (words[r, j].item() >> (4 * i)) & 15
        assert nibble == codes[r, g * group + i * gw + j % gw].item(), (r, j, i)
    assert torch.equal(int4_bytes(words, group), q)
    with pytest.raises(ValueError, match="multiple of 32"):
        int4_words(PackedLinear(torch.randn(2, 64), "int4_g16", torch.float32).q, 16)


def test_int8_input_blocks_round_each_block_of_32_to_its_own_scale():
    """The W4A8 product's input: per group, the inputs under 4 consecutive words (i * G/8 + 4c + d) share
    one symmetric int8 scale, their largest magnitude over 127."""
    from workers.compression.decode import int8_input_blocks

    group = 128
    x = torch.randn(2 * group, generator=torch.Generator().manual_seed(0))
    x[group + 16 * 3 + 5] = 50.0  # group 1, i = 3, word 5: block c = 1
    got = int8_input_blocks(x, group)
    blocks = x.reshape(2, 8, group // 32, 4)  # [group, i, c, d]
    scale = blocks.abs().amax(dim=(1, 3)) / 127
    err = (got - x).reshape(2, 8, group // 32, 4).abs()
    assert (err <= scale[:, None, :, None] / 2 + 1e-6).all()  # within half a step of its own block
    assert err[1, :, 1].max() > 0.05  # the outlier's block is coarse ...
    assert err[1, :, [0, 2, 3]].max() < 0.03  # ... the other blocks of its group are not
    assert err[0].max() < 0.03
    # the largest input of a block is kept exactly, a block of zeros stays zero
    assert got[group + 16 * 3 + 5] == 50.0
    assert int8_input_blocks(torch.zeros(group), group).abs().sum() == 0


def test_a_packed_linear_with_int8_inputs_multiplies_the_rounded_input():
    from workers.compression.decode import int8_input_blocks

    w, x = torch.randn(16, 256), torch.randn(256)
    plain = PackedLinear(w, "int4_g64", torch.float32)
    a8 = PackedLinear(w, "int4_g64", torch.float32, int8_inputs=True)
    assert a8.a8
    assert not plain.a8
    torch.testing.assert_close(a8(x), plain(int8_input_blocks(x, 64)))
    assert not PackedLinear(w, "int4_g16", torch.float32, int8_inputs=True).a8  # blocks need groups of 32n
    assert not PackedLinear(w, "int8", torch.float32, int8_inputs=True).a8


def test_a_packed_linear_holding_int4_words_multiplies_by_the_same_weight():
    layer = PackedLinear(torch.randn(12, 256), "int4_g64", torch.float32)
    x = torch.randn(256)
    want = layer(x)
    layer.q = int4_words(layer.q, 64)
    layer.words = True
    torch.testing.assert_close(layer(x), want, rtol=0, atol=0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_packed_embedding_returns_the_fake_quantized_row(fmt):
    w = torch.randn(50, 64, generator=torch.Generator().manual_seed(3))
    emb = PackedEmbedding(w, fmt, torch.float32)
    torch.testing.assert_close(emb(torch.tensor([17])), fake_quant(w, fmt)[17], atol=1e-6, rtol=1e-6)


def test_unquantized_decode_matches_the_transformers_model_token_by_token(lm):
    ids = tokens()
    with torch.no_grad():
        ref = lm(input_ids=ids, use_cache=False).logits[0]
    out = decode_all(DecodeLlama(lm, None, max_len=16, dtype=torch.float32), ids)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_a_mixed_assignment_decodes_like_the_fake_quantized_model(lm):
    names = list(quantizable_layers(lm))
    # Formats alternate so that Q/K/V and gate/up are split into several products as well as fused.
    assignment = {f"lm.{n}": FORMATS[i % 4] for i, n in enumerate(names)}
    ids = tokens(9, seed=4)
    simulated = apply_simulated(copy.deepcopy(lm), {k.removeprefix("lm."): v for k, v in assignment.items()})
    with torch.no_grad():
        ref = simulated(input_ids=ids, use_cache=False).logits[0]
        plain = lm(input_ids=ids, use_cache=False).logits[0]
    out = decode_all(DecodeLlama(lm, assignment, max_len=16, dtype=torch.float32), ids)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    assert (out - plain).abs().max() > 1e-3  # the quantization is really there


def test_a_uniform_assignment_fuses_qkv_and_gate_up_and_counts_the_packed_bytes(lm):
    layers = quantizable_layers(lm)
    dec = DecodeLlama(lm, dict.fromkeys(layers, "int4_g32"), max_len=8, dtype=torch.float32)
    assert all(len(layer.qkv) == 1 and len(layer.gate_up) == 1 for layer in dec.layers)
    norms = sum(p.numel() for n, p in lm.named_parameters() if "norm" in n) * 4
    assert dec.weight_bytes() == sum(estimate_bytes(tuple(m.weight.shape), "int4_g32") for m in layers.values()) + norms
    plain = DecodeLlama(lm, None, max_len=8, dtype=torch.bfloat16)
    assert plain.weight_bytes() == 2 * sum(p.numel() for p in lm.parameters())


def test_the_cache_is_written_at_the_position_and_reset_clears_it(lm):
    dec = DecodeLlama(lm, None, max_len=8, dtype=torch.float32)
    with torch.no_grad():
        dec(torch.tensor([5]), torch.tensor([3]))
    k = dec.layers[0].k
    assert k[:, 3].abs().sum() > 0
    assert k[:, :3].abs().sum() == 0
    assert k[:, 4:].abs().sum() == 0
    dec.reset()
    assert k.abs().sum() == 0


def test_bad_assignments_are_refused(lm):
    with pytest.raises(DecodeError, match="does not have"):
        DecodeLlama(lm, {"lm.model.layers.9.mlp.up_proj": "int8"})
    with pytest.raises(DecodeError, match="does not divide"):
        PackedLinear(torch.randn(8, 100), "int4_g64", torch.float32)
    with pytest.raises(DecodeError, match="unknown decode backend"):
        PackedLinear(torch.randn(8, 128), "int4_g64", torch.float32, backend="magic")
    # programmatic dependent launch: the triton backend on a Hopper or newer GPU only
    with pytest.raises(DecodeError, match="programmatic dependent launch"):
        DecodeLlama(lm, {}, backend="torch", pdl=True)


TRITON_CHECK = """
import torch
from workers.compression.decode import DecodeLlama, PackedLinear
from workers.compression.models import _build_llama
from workers.compression.quantize import quantizable_layers

w, x = torch.randn(40, 256), torch.randn(256)

def close(got, want):
    # int4 runs as words by default: x * (1 + q / 256) summed, then sum(x) taken off, which costs a
    # few 1e-6 of the output's range in fp32 (the byte kernel is within 1e-7)
    torch.testing.assert_close(got, want, atol=max(1e-4, 1e-5 * float(want.abs().max())), rtol=1e-4)


for fmt in ["int4_g64", "int8", "fp8_e4m3", "bf16", "fp32"]:
    layer = PackedLinear(w, fmt, torch.float32, backend="triton")
    assert layer.words == fmt.startswith("int4")
    close(layer.fused(x), layer(x))
    res = torch.randn(40)
    close(layer.fused(x, residual=res), layer(x) + res)
    gate_up = PackedLinear(torch.randn(64, 256), fmt, torch.float32, backend="triton")
    y = gate_up(x)
    act = torch.nn.functional.silu(y[:32]) * y[32:]
    close(gate_up.fused(x, epilogue=1), act)  # SILU_PAIR
a8 = PackedLinear(w, "int4_g64", torch.float32, backend="triton", int8_inputs=True)
assert a8.a8
close(a8.fused(x), a8(x))  # W4A8: the interpreter's dp4a written out, against the torch expression
close(a8.fused(x, residual=res), a8(x) + res)
rms = torch.sqrt(x.pow(2).mean() + 1e-6)
close(a8.fused(x, 1), a8(x / rms))  # an RMSNorm without a weight (RMSNORM_UNIT)
lm = _build_llama(False, smoke=True).lm.float()
names = list(quantizable_layers(lm))
ids = torch.randint(0, 1024, (6,), generator=torch.Generator().manual_seed(0))
mix = {n: ["int4_g32", "int8", "fp8_e4m3", "bf16"][i % 4] for i, n in enumerate(names)}
for assignment in ({}, mix):
    outs = []
    for backend in ("torch", "triton"):
        dec = DecodeLlama(lm, assignment, max_len=16, dtype=torch.float32, backend=backend)
        with torch.no_grad():
            outs.append(torch.stack([dec(ids[i : i + 1], torch.tensor([i])) for i in range(6)]))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)
outs = []
for backend in ("torch", "triton"):  # W4A8 on both: the kernel and the torch expression round alike
    dec = DecodeLlama(lm, mix, max_len=16, dtype=torch.float32, backend=backend, int8_inputs=True)
    assert sum(m.a8 for m in dec.modules() if isinstance(m, PackedLinear)) > 0
    with torch.no_grad():
        outs.append(torch.stack([dec(ids[i : i + 1], torch.tensor([i])) for i in range(6)]))
torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)
print("ok")
"""


@pytest.mark.timeout(900)  # about 5 minutes on 2 cores: every kernel and two Llama steps interpreted
def test_the_triton_kernels_compute_what_the_torch_expressions_compute():
    """Under Triton's interpreter, where Triton is installed (tests/gpu runs the kernels compiled)."""
    import importlib.util
    import os
    import subprocess
    import sys
    from pathlib import Path

    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed (it comes with CUDA builds of PyTorch)")
    env = dict(os.environ, TRITON_INTERPRET="1")  # CPU tensors, on any machine
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", TRITON_CHECK], env=env, capture_output=True, text=True, timeout=840)
    if "only 0-dimensional arrays can be converted to Python scalars" in done.stderr:
        # Triton 3.6's interpreter takes a loop over a runtime argument's range with int() of a 1-element
        # array, which NumPy >= 2.3 refuses; the compiled kernels are checked by tests/gpu.
        pytest.skip("this Triton's interpreter does not run under this NumPy (range over a runtime argument)")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")


def test_gptq_packed_weights_decode_like_the_gptq_model(lm):
    from workers.compression.gptq import collect_hessians
    from workers.compression.quantize import Rounding

    layers = quantizable_layers(lm)
    fit = tokens(32, seed=9)
    rounding = Rounding(collect_hessians(layers, lambda: lm(input_ids=fit, use_cache=False)))
    # Q/K/V share int4 (one stacked product of three GPTQ packs); gate int4, up int8 (two products).
    assignment = {n: ("int8" if n.endswith("up_proj") else "int4_g32") for n in layers if n != "model.embed_tokens"}
    ids = tokens(6, seed=5)
    simulated = apply_simulated(copy.deepcopy(lm), assignment, rounding)
    rtn = apply_simulated(copy.deepcopy(lm), assignment)
    with torch.no_grad():
        ref = simulated(input_ids=ids, use_cache=False).logits[0]
        ref_rtn = rtn(input_ids=ids, use_cache=False).logits[0]
    dec = DecodeLlama(lm, assignment, max_len=16, dtype=torch.float32, rounding=rounding)
    assert len(dec.layers[0].qkv) == 1
    assert len(dec.layers[0].gate_up) == 2
    out = decode_all(dec, ids)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    assert (ref - ref_rtn).abs().max() > 1e-4  # GPTQ's packs are not RTN's
