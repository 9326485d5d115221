"""FP8 W8A8 Linear layers (fp8_linear.py) on this CPU: the arithmetic a GPU's FP8 tensor cores compute,
from the engine's packed fp8_e4m3 format, and the assignment restricted to it."""

import copy

import pytest
import torch
from torch import nn

from workers.compression.fp8_linear import FP8, Fp8Linear, kernel_available, quantize_rows, swap_fp8_linears
from workers.compression.quantize import fake_quant, pack, unpack

torch.manual_seed(0)


def test_rows_are_quantized_each_with_its_own_scale():
    x = torch.randn(5, 64) * torch.tensor([0.01, 1.0, 30.0, 500.0, 1e-4])[:, None]
    q, scale = quantize_rows(x)
    assert q.dtype == FP8
    assert scale.shape == (5, 1)
    assert torch.allclose(q.float().abs().amax(dim=1), torch.full((5,), 448.0))  # each row uses the full range
    back = q.float() * scale
    rel = ((back - x).abs().amax(dim=1) / x.abs().amax(dim=1))
    assert (rel < 2 ** -3).all()  # e4m3: 3 mantissa bits, at most half a step of 2^-3 relative


def test_an_fp8_linear_is_the_packed_weight_times_the_rounded_input():
    layer = nn.Linear(96, 48)
    packed = pack(layer.weight, "fp8_e4m3")
    fp8 = Fp8Linear.from_packed(packed, layer.bias, out_dtype=torch.float32)
    x = torch.randn(3, 7, 96)
    got = fp8(x)
    assert got.shape == (3, 7, 48)
    assert got.dtype == torch.float32
    # Exactly: e4m3-rounded input (per token) times the unpacked weight, plus the bias.
    q, s = quantize_rows(x.reshape(-1, 96))
    w = unpack(packed, "fp8_e4m3", (48, 96))
    want = ((q.float() * s) @ w.t() + layer.bias).reshape(3, 7, 48)
    assert torch.allclose(got, want, atol=1e-5)
    # And close to the fp32 layer: W8A8 e4m3 keeps about two significant digits.
    ref = layer(x)
    cos = nn.functional.cosine_similarity(got.reshape(-1, 48), ref.reshape(-1, 48), dim=1)
    assert cos.min() > 0.995
    assert not torch.allclose(got, ref, atol=1e-4)  # it is quantized, not the fp32 layer


def test_bad_weights_are_refused():
    with pytest.raises(ValueError, match="one scale per output row"):
        Fp8Linear(torch.zeros(4, 16, dtype=FP8), torch.ones(3), None)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        Fp8Linear(torch.zeros(4, 16), torch.ones(4), None)


def test_swapping_keeps_the_model_working_and_only_touches_the_named_layers():
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16))
    x = torch.randn(8, 32)
    ref = model(x)
    swapped = copy.deepcopy(model)
    done = swap_fp8_linears(swapped, {"0": pack(model[0].weight, "fp8_e4m3")}, out_dtype=torch.float32)
    assert done == ["0"]
    assert isinstance(swapped[0], Fp8Linear)
    assert isinstance(swapped[2], nn.Linear)
    got = swapped(x)
    assert nn.functional.cosine_similarity(got, ref, dim=1).min() > 0.995
    with pytest.raises(ValueError, match="not a Linear"):
        swap_fp8_linears(swapped, {"1": pack(model[0].weight, "fp8_e4m3")})


def test_no_kernel_on_a_cpu():
    assert kernel_available("cpu") is False


@pytest.mark.skipif(not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"), reason="no CPU int4 kernel")
def test_int4_linear_layers_run_on_the_cpu_kernel_at_the_packed_grid():
    from workers.compression.gptq import gptq_int4
    from workers.compression.int4_linear import Int4Linear, kernel_available
    from workers.compression.quantize import Rounding, apply_torchao

    assert kernel_available("cpu")
    layer = nn.Linear(384, 256)
    x = torch.randn(64, 384)
    hessian = (x.T @ x).float()
    packed = gptq_int4(layer.weight.detach(), hessian, 64)
    image = unpack(packed, "int4_g64", (256, 384))
    want = nn.functional.linear(x, image, layer.bias)
    module = Int4Linear(packed, 384, 256, 64, layer.bias, torch.float32)
    got = module(x)
    assert got.dtype == torch.float32
    # bf16 inputs, scales and zeros are all that differ from the packed image.
    assert (got - want).abs().mean() <= 0.01 * want.abs().mean()
    assert (got - layer(x)).abs().mean() > 2 * (got - want).abs().mean()  # nearer the image than fp32's weights
    # Through apply_torchao on the CPU without torchao: int4 on the kernel, int8 simulated.
    model = nn.Sequential(layer, nn.ReLU(), nn.Linear(256, 32))
    executed, simulated = apply_torchao(copy.deepcopy(model), {"0": "int4_g64", "2": "int8"}, "cpu",
                                        Rounding({"0": hessian}), use_torchao=False)
    assert isinstance(executed[0], Int4Linear)
    assert simulated == ["2"]
    assert isinstance(executed[2], nn.Linear)
    assert type(executed[2].weight).__name__ == "Parameter"
    # Inputs need only be whole groups on the CPU; outputs come in 16s, so a 10-way head stays simulated.
    odd = nn.Sequential(nn.Linear(96, 64), nn.Linear(64, 10))
    executed, simulated = apply_torchao(copy.deepcopy(odd), {"0": "int4_g32", "1": "int4_g32"}, "cpu",
                                        use_torchao=False)
    assert isinstance(executed[0], Int4Linear)
    assert simulated == ["1"]
    x = torch.randn(8, 96)
    assert (executed[0](x) - nn.functional.linear(x, fake_quant(odd[0].weight, "int4_g32"), odd[0].bias)
            ).abs().max() < 0.05


@pytest.mark.skipif(not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"), reason="no CPU int4 kernel")
def test_an_artifact_goes_to_the_kernels_from_its_stored_packs(tmp_path):
    """What `artifact DIR --device cuda` does, run on the CPU kernel: the layers are built from the stored
    packed tensors, and the model computes what the artifact's own (unpacked) model computes."""
    from workers.compression import artifact, engine
    from workers.compression.int4_linear import Int4Linear

    out = tmp_path / "art"
    report = engine.run(engine.Options(model="digits-cnn", keep_ratio=1.0, out=out, latency_repeats=1))
    manifest, stored = artifact.read(out)
    packs = artifact.stored_packs(manifest, stored)
    assert packs["classifier.1"][0] == "int4_g64"
    assert set(packs["classifier.1"][1]) == {"q", "scale", "zero"}
    served, counts = artifact.to_kernels(artifact.build(manifest, stored), packs, torch.device("cpu"))
    assert counts == {"Int4Linear": 1}  # 160 x 320: whole groups, outputs in 16s; the 10-way head is not
    assert isinstance(served.classifier[1], Int4Linear)
    unpacked = artifact.build(manifest, stored)
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        got, want = served(x.to(torch.bfloat16)).float(), unpacked(x)
    assert (got.argmax(1) == want.argmax(1)).float().mean() >= 0.9
    assert (got - want).abs().mean() <= 0.05 * want.abs().mean()
    assert report["compressed"]["executed_quality"] == pytest.approx(report["compressed"]["quality"], abs=0.5)
