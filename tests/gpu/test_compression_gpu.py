"""The compression engine on a CUDA GPU: torchao kernels execute the assignment (skipped without CUDA)."""

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_a_digits_run_on_cuda_matches_its_budget():
    from workers.compression import engine

    report = engine.run(engine.Options(model="digits-cnn", quantize="auto", keep_ratio=1.0, device="cuda"))
    assert report["device"] == "cuda"
    assert report["baseline"]["quality"] - report["compressed"]["quality"] <= 0.3 + 1e-9
    assert report["baseline"]["weight_bytes"] / report["compressed"]["weight_bytes"] >= 4


def test_torchao_executes_int8_and_int4_linears_on_cuda():
    from workers.compression.quantize import apply_torchao

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256)).to("cuda", torch.bfloat16)
    x = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16)
    ref = model(x).float()
    quantized, simulated = apply_torchao(model, {"0": "int8", "1": "int4_g128"}, "cuda")
    assert simulated == []
    assert type(quantized[0].weight).__name__ != "Parameter"
    out = quantized(x).float()
    assert torch.nn.functional.cosine_similarity(out, ref).mean() > 0.98
