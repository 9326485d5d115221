"""Gradient codecs: what survives a round trip, what goes on the wire, and how error feedback repays the loss."""
from __future__ import annotations

import pytest
import torch

from workers.training.hcof.codecs import CHUNK, CodecError, ErrorFeedback, parse_codec, wire_bytes


def _grad(parts: int = 2, m: int = 4 * CHUNK, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(parts, m, generator=gen) * torch.logspace(0, -2, m)


@pytest.mark.parametrize(("name", "levels"), [("int8", 127), ("int4", 7)])
def test_int_codecs_round_trip_within_half_a_quantization_step(name, levels):
    codec = parse_codec(name)
    x = _grad()
    wire = codec.encode(x)
    back = codec.decode(wire, x.shape[1])
    step = x.reshape(2, -1, CHUNK).abs().amax(dim=2, keepdim=True) / levels
    assert ((back - x).reshape(2, -1, CHUNK).abs() <= step / 2 + 1e-7).all()


def test_int4_sends_half_a_byte_per_value_plus_one_scale_per_chunk():
    x = _grad(parts=1, m=8 * CHUNK)
    wire = parse_codec("int4").encode(x)
    assert wire_bytes(wire) == 8 * CHUNK // 2 + 8 * 4
    assert 32 * x.numel() / (8 * wire_bytes(wire)) > 7.7  # bits per fp32 value over bits on the wire


def test_int4_keeps_the_sign_and_the_extremes_of_each_chunk():
    x = torch.zeros(1, CHUNK)
    x[0, :4] = torch.tensor([-3.0, 3.0, 1.5, -0.2])
    back = parse_codec("int4").decode(parse_codec("int4").encode(x), CHUNK)
    assert back[0, 0] == pytest.approx(-3.0)
    assert back[0, 1] == pytest.approx(3.0)
    assert back[0, 2] == pytest.approx(1.5, abs=3.0 / 14 + 1e-6)  # within half a step (3/7 per step)
    assert back[0, 4:].abs().sum() == 0


def test_topk_sends_only_the_largest_magnitudes_with_their_positions():
    codec = parse_codec("topk:0.01")
    x = torch.zeros(2, 1000)
    x[0, 17], x[0, 400], x[1, 3] = 5.0, -7.0, 2.0
    wire = codec.encode(x)
    assert wire["idx"].shape == (2, 10)
    back = codec.decode(wire, 1000)
    assert back[0, 17] == 5.0
    assert back[0, 400] == -7.0
    assert back[1, 3] == 2.0
    assert wire_bytes(wire) == 2 * 10 * (4 + 4)


def test_bf16_halves_the_bytes_and_keeps_three_significant_digits():
    x = _grad()
    codec = parse_codec("bf16")
    wire = codec.encode(x)
    assert wire_bytes(wire) == x.numel() * 2
    assert torch.allclose(codec.decode(wire, x.shape[1]), x, rtol=1e-2, atol=0)


@pytest.mark.parametrize("name", ["int4", "topk:0.1"])
def test_error_feedback_delivers_what_compression_dropped_in_later_rounds(name):
    codec = parse_codec(name)
    ef = ErrorFeedback()
    x = _grad()
    rounds = 40
    sent = torch.zeros_like(x)
    for _ in range(rounds):
        sent += codec.decode(ef.compress("slot", codec, x), x.shape[1])
    one_round = (codec.decode(codec.encode(x), x.shape[1]) - x).norm()
    averaged = (sent / rounds - x).norm()
    assert averaged < one_round / 5
    # Nothing is lost: what was sent plus what is still owed is exactly what was asked for.
    assert torch.allclose(sent + ef.residuals["slot"], rounds * x, atol=1e-4)


def test_error_feedback_keeps_one_residual_per_slot():
    codec = parse_codec("int8")
    ef = ErrorFeedback()
    ef.compress("a", codec, _grad(seed=1))
    ef.compress("b", codec, _grad(seed=2))
    assert set(ef.residuals) == {"a", "b"}
    restored = ErrorFeedback()
    restored.load_state_dict(ef.state_dict(), torch.device("cpu"))
    assert torch.equal(restored.residuals["a"], ef.residuals["a"])


@pytest.mark.parametrize("text", ["topk:0", "topk:1.5", "topk:-0.1", "topk:abc", "int3", "zstd", "powersgd:0"])
def test_it_rejects_unknown_codecs_and_out_of_range_parameters(text):
    with pytest.raises(CodecError):
        parse_codec(text)


def test_a_topk_ratio_of_one_is_allowed():
    assert parse_codec("topk:1").ratio == 1.0


@pytest.mark.parametrize("text", ["int4", "int8", "topk:0.05", "bf16", "none"])
def test_a_wire_packed_into_one_byte_matrix_comes_back_whole(text):
    from workers.training.hcof.collectives import _pack, _unpack

    codec = parse_codec(text)
    parts = 4
    wire = codec.encode(_grad(parts=parts))
    packed, layout = _pack(wire, parts)
    assert packed.shape[0] == parts  # row i is what peer i receives in the all-to-all
    assert packed.numel() * packed.element_size() == wire_bytes(wire)
    back = _unpack(packed, layout)
    assert set(back) == set(wire)
    for name, t in wire.items():
        assert back[name].dtype == t.dtype
        assert back[name].shape == t.shape
        assert torch.equal(back[name], t)
    # Row i of the packed matrix carries row i of every tensor: an all-to-all that delivers rows keeps pieces whole.
    one_row = _unpack(packed[1:2], layout)
    for name, t in wire.items():
        assert torch.equal(one_row[name], t[1:2])


def test_gathered_rows_unpack_to_every_rank_piece_stacked():
    from workers.training.hcof.collectives import _pack, _unpack

    idx = torch.tensor([[3, 7, 0]], dtype=torch.int64)
    val = torch.arange(3 * 5, dtype=torch.float32).reshape(1, 3, 5)
    packed, layout = _pack({"idx": idx, "val": val}, 1)
    gathered = torch.cat([packed, packed + 0], dim=0)  # what an all-gather over two ranks returns
    out = _unpack(gathered, layout)
    assert out["idx"].shape == (2, 3)
    assert out["val"].shape == (2, 3, 5)
    assert torch.equal(out["val"][1], val[0])
    assert torch.equal(out["idx"][0], idx[0])
