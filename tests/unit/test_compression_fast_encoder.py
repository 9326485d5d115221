"""The fused-QKV BERT encoder and its FP8 form with static input scales (fast_encoder.py), on this
CPU: the same outputs as HF's BertModel, and the arithmetic a GPU's tensor-wise FP8 GEMM computes."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel

from workers.compression.fast_encoder import (
    Encoder,
    PackedEmbedding,
    StaticFp8Linear,
    batches_of,
    choose_fp8_groups,
    executed_encoder,
    fp8_static_encoder,
    input_amax,
    linear_names,
)
from workers.compression.fp8_linear import FP8, FP8_MAX
from workers.compression.models import HiddenStates, SentenceEmbedder
from workers.compression.quantize import Rounding, pack, unpack

torch.manual_seed(0)
CONFIG = dict(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
              max_position_embeddings=64)


def small_bert() -> BertModel:
    return BertModel(BertConfig(**CONFIG), add_pooling_layer=False).eval()


def inputs(batch=3, length=16, pad_last=5, seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, CONFIG["vocab_size"], (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, length - pad_last:] = 0  # one padded sentence: the mask must matter
    return ids, mask


@pytest.mark.parametrize("wrapper", [HiddenStates, SentenceEmbedder])
@torch.inference_mode()
def test_the_encoder_computes_what_hf_bert_computes(wrapper):
    model = wrapper(small_bert())
    ids, mask = inputs()
    want = model(ids, mask)
    got = Encoder(model).eval()(ids, mask)
    assert got.shape == want.shape
    if wrapper is HiddenStates:  # padded positions are not compared (neither attends to them)
        keep = mask.bool()
        got, want = got[keep], want[keep]
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert len(Encoder(model).layers[0].qkv.weight) == 3 * CONFIG["hidden_size"]  # Q, K and V in one GEMM


def test_a_model_that_is_not_a_bert_encoder_is_refused():
    with pytest.raises(ValueError, match="BERT task model"):
        Encoder(nn.Sequential(nn.Linear(4, 4)))


@torch.inference_mode()
def test_a_static_fp8_linear_is_the_rounded_input_times_the_one_scale_weight():
    layer = nn.Linear(96, 48)
    x = torch.randn(2, 5, 96)
    scale = x.abs().amax().item() / FP8_MAX
    fp8 = StaticFp8Linear(layer.weight, layer.bias, scale)
    assert fp8.qweight.dtype == FP8
    assert fp8.weight_scale.shape == ()
    got = fp8(x)
    assert got.shape == (2, 5, 48)
    assert got.dtype == torch.bfloat16
    xq = (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).float() * scale
    w = fp8.qweight.float() * fp8.weight_scale
    want = xq.reshape(-1, 96) @ w.t() + layer.bias.to(torch.bfloat16).float()
    assert torch.allclose(got.float().reshape(-1, 48), want, atol=3e-2, rtol=1e-2)  # bf16 output
    ref = layer(x).reshape(-1, 48)
    cos = F.cosine_similarity(got.float().reshape(-1, 48), ref, dim=1)
    assert cos.min() > 0.99
    assert not torch.allclose(got.float().reshape(-1, 48), ref, atol=1e-3)  # quantized, not the fp32 layer


@torch.inference_mode()
def test_an_input_beyond_the_calibrated_range_is_clipped_not_overflowed():
    layer = nn.Linear(16, 8, bias=False)
    fp8 = StaticFp8Linear(layer.weight, None, input_scale=1.0 / FP8_MAX)  # calibrated for |x| <= 1
    x = torch.zeros(1, 16)
    x[0, 0] = 1000.0  # far outside: it must become +1 (448 x scale), not inf or NaN
    got = fp8(x).float()
    assert torch.isfinite(got).all()
    want = fp8.qweight.float()[:, 0] * fp8.weight_scale * 1.0
    assert torch.allclose(got[0], want, atol=2e-2)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_a_bad_input_scale_is_refused(bad):
    with pytest.raises(ValueError, match="input scale"):
        StaticFp8Linear(torch.randn(8, 16), None, bad)


@torch.inference_mode()
def test_a_packed_embedding_looks_up_the_packed_rows_exactly():
    table = nn.Embedding(50, 40)  # 40 columns, group 64 -> one group per row, clipped to the row
    emb = PackedEmbedding(table, "int4_g64")
    ids = torch.tensor([[3, 0, 49], [7, 7, 1]])
    got = emb(ids)
    assert got.shape == (2, 3, 40)
    assert got.dtype == torch.bfloat16
    full = unpack(pack(table.weight, "int4_g64"), "int4_g64", (50, 40))
    assert torch.equal(got, full[ids].to(torch.bfloat16))
    with pytest.raises(ValueError, match="int4"):
        PackedEmbedding(table, "int8")


@torch.inference_mode()
def test_static_scales_come_from_the_calibration_inputs_and_keep_fidelity():
    model = SentenceEmbedder(small_bert())
    calib = [inputs(seed=s) for s in (2, 3)]
    held_out = inputs(seed=9)
    fast = fp8_static_encoder(model, calib, margin=1.0)
    names = linear_names(Encoder(model))
    assert set(names) == {n for n, m in fast.named_modules() if isinstance(m, StaticFp8Linear)}
    amax = input_amax(Encoder(model).eval(), calib)
    for name in names:
        layer = dict(fast.named_modules())[name]
        assert layer.input_scale.item() == pytest.approx(amax[name] / FP8_MAX, rel=1e-6)
    assert isinstance(fast.embeddings.word_embeddings, PackedEmbedding)
    cos = F.cosine_similarity(fast(*held_out).float(), model(*held_out), dim=-1)
    assert cos.min() > 0.995, cos  # 0.9994-0.9998 over eight random models

    only_mlp = [n for n in names if n.endswith((".fc1", ".fc2"))]
    partial = fp8_static_encoder(model, calib, fp8_layers=only_mlp, word_format=None)
    fp8_layers = {n for n, m in partial.named_modules() if isinstance(m, StaticFp8Linear)}
    assert fp8_layers == set(only_mlp)
    assert isinstance(partial.layers[0].qkv, nn.Linear)
    assert partial.layers[0].qkv.weight.dtype == torch.bfloat16
    assert isinstance(partial.embeddings.word_embeddings, nn.Embedding)


def test_bad_arguments_are_refused():
    model = HiddenStates(small_bert())
    calib = [inputs()]
    with pytest.raises(ValueError, match="not Linear layers of the encoder: layers.9.fc1"):
        fp8_static_encoder(model, calib, fp8_layers=["layers.9.fc1"])
    with pytest.raises(ValueError, match="margin"):
        fp8_static_encoder(model, calib, margin=0)
    with pytest.raises(ValueError, match="calibration batch"):
        fp8_static_encoder(model, [])


def test_one_scale_fp8_packs_are_what_the_static_linear_runs_without_rounding_twice():
    w = torch.randn(48, 96) * torch.linspace(0.01, 3.0, 48)[:, None]  # rows of very different ranges
    packed = Rounding(fp8_one_scale=True).pack("any", w, "fp8_e4m3")
    assert torch.equal(packed["scale"], packed["scale"][:1].expand(48))  # one scale, stored per row
    rowwise = Rounding().pack("any", w, "fp8_e4m3")
    assert not torch.equal(rowwise["scale"], rowwise["scale"][:1].expand(48))  # the default: a scale per row
    unpacked = unpack(packed, "fp8_e4m3", (48, 96))
    static = StaticFp8Linear(unpacked, None, input_scale=0.01)
    assert torch.equal(static.qweight.view(torch.uint8), packed["q"])  # the same codes, not re-rounded
    assert static.weight_scale.item() == pytest.approx(packed["scale"][0].item(), rel=1e-6)


@torch.inference_mode()
def test_the_runner_executes_only_whole_fp8_qkv_groups_on_the_static_path():
    model = SentenceEmbedder(small_bert())
    calib = [inputs(seed=2)]
    layer0 = "bert.encoder.layer.0."
    assignment = {
        f"{layer0}attention.self.query": "fp8_e4m3", f"{layer0}attention.self.key": "fp8_e4m3",
        f"{layer0}attention.self.value": "int8",  # breaks layer 0's Q/K/V group
        f"{layer0}intermediate.dense": "fp8_e4m3",
        "bert.encoder.layer.1.attention.self.query": "fp8_e4m3", "bert.encoder.layer.1.attention.self.key": "fp8_e4m3",
        "bert.encoder.layer.1.attention.self.value": "fp8_e4m3",
        "bert.embeddings.word_embeddings": "int4_g64",
    }
    executed, info = executed_encoder(model, assignment, calib)
    static = {n for n, m in executed.named_modules() if isinstance(m, StaticFp8Linear)}
    assert static == {"layers.0.fc1", "layers.1.qkv"}
    assert sorted(info["input_scales"]) == sorted(static)
    assert isinstance(executed.embeddings.word_embeddings, PackedEmbedding)
    assert info["simulated_layers"] == sorted([f"{layer0}attention.self.query", f"{layer0}attention.self.key",
                                               f"{layer0}attention.self.value"])
    # The stored scales rebuild the same model: what serving an artifact does.
    again, _ = executed_encoder(model, assignment, None, input_scales=info["input_scales"])
    ids, mask = inputs(seed=5)
    assert torch.equal(again(ids, mask), executed(ids, mask))
    with pytest.raises(ValueError, match="no Linear layer"):
        executed_encoder(model, {f"{layer0}attention.self.query": "fp8_e4m3"}, calib)
    with pytest.raises(ValueError, match="no input scale for layers.1.qkv"):
        executed_encoder(model, assignment, None, input_scales={"layers.0.fc1": 0.1})


@torch.inference_mode()
def test_a_head_pruned_layer_runs_with_its_own_head_count():
    model = HiddenStates(small_bert())
    att = model.bert.encoder.layer[0].attention.self
    keep = torch.arange(2 * att.attention_head_size)  # 2 of 4 heads left in layer 0
    for lin in (att.query, att.key, att.value):
        new = nn.Linear(lin.in_features, len(keep))
        with torch.no_grad():
            new.weight.copy_(lin.weight[keep])
            new.bias.copy_(lin.bias[keep])
        setattr(att, {id(att.query): "query", id(att.key): "key", id(att.value): "value"}[id(lin)], new)
    dense = model.bert.encoder.layer[0].attention.output.dense
    small = nn.Linear(len(keep), dense.out_features)
    with torch.no_grad():
        small.weight.copy_(dense.weight[:, keep])
        small.bias.copy_(dense.bias)
    model.bert.encoder.layer[0].attention.output.dense = small
    att.num_attention_heads, att.all_head_size = 2, len(keep)
    ids, mask = inputs(pad_last=0)
    want = model(ids, mask)
    enc = Encoder(model).eval()
    assert enc.layers[0].heads == 2
    assert enc.layers[1].heads == 4
    assert torch.allclose(enc(ids, mask), want, atol=1e-5)


def test_example_inputs_are_stretched_or_cut_to_each_batch_size():
    ids, mask = inputs(batch=3, length=16)
    got = batches_of((ids, mask), (1, 8))
    assert list(got) == ["b1x16", "b8x16"]
    assert got["b1x16"][0].shape == (1, 16)
    assert got["b8x16"][0].shape == (8, 16)
    assert torch.equal(got["b8x16"][0][3:6], ids)  # repeated, in order


def test_the_fp8_groups_kept_are_the_candidate_with_the_best_measured_times(monkeypatch):
    """The choice logic alone (the timing itself needs CUDA: tests/gpu): a fake clock where each FP8
    attention projection costs time and each FP8 MLP Linear saves some."""
    from workers.compression import fast_encoder

    def fake_ms(model, x):
        fp8 = [n for n, m in model.named_modules() if isinstance(m, StaticFp8Linear)]
        return 10.0 + sum(1.0 if n.endswith((".qkv", ".o")) else -0.5 for n in fp8) * x[0].shape[0] / 64

    monkeypatch.setattr(fast_encoder, "graph_latencies_ms",
                        lambda models, x: {label: fake_ms(m, x) for label, m in models.items()})
    model = SentenceEmbedder(small_bert())
    lin = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assignment = dict.fromkeys(lin, "fp8_e4m3")
    _, calibrated = executed_encoder(model, assignment, [inputs()])
    groups, info = choose_fp8_groups(model, assignment, calibrated["input_scales"], inputs(batch=8, length=16))
    assert info["chosen"] == "MLP Linears only"
    assert groups == ["layers.0.fc1", "layers.0.fc2", "layers.1.fc1", "layers.1.fc2"]
    assert info["ratio_to_bf16"]["MLP Linears only"]["b64x16"] < 1 < info["ratio_to_bf16"]["every fp8 Linear"]["b64x16"]


@pytest.mark.parametrize("with_bias", [True, False])
def test_the_cpu_product_of_a_static_fp8_linear_is_what_torchs_scaled_mm_computes(with_bias):
    """On CPU the layer multiplies the e4m3 operands in fp32 (torch's CPU _scaled_mm can take seconds):
    bit for bit the bf16 result of torch._scaled_mm on the same operands and scales."""
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(48, 96, generator=g) * 0.1
    bias = torch.randn(48, generator=g) if with_bias else None
    layer = StaticFp8Linear(weight, bias, input_scale=3.0 / FP8_MAX)
    x = torch.randn(2, 8, 96, generator=g)
    xq = layer.quantize_input(x.reshape(-1, 96))
    want = torch._scaled_mm(xq, layer.qweight.t(), scale_a=layer.input_scale, scale_b=layer.weight_scale,
                            bias=layer.bias, out_dtype=torch.bfloat16, use_fast_accum=True)
    got = layer(x)
    assert got.shape == (2, 8, 48)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got.reshape(-1, 48), want)
