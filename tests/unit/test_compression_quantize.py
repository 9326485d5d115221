"""Weight formats, packing and the sensitivity-driven assignment (no Django, no downloads)."""

import copy
import math

import pytest
import torch
from torch import nn

from workers.compression import MODEL_NAMES, models, sensitivity
from workers.compression.quantize import (
    estimate_bytes,
    fake_quant,
    format_bits,
    pack,
    packed_bytes,
    unpack,
)


def weight(rows=24, cols=100, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def test_int4_packs_two_weights_per_byte_with_a_scale_and_minimum_per_group():
    w = weight(24, 100)  # 100 columns: two groups of 64, the second zero-padded
    packed = pack(w, "int4_g64")
    assert packed["q"].dtype == torch.uint8
    assert packed["q"].numel() == 24 * 128 // 2
    assert packed["scale"].shape == (24, 2)
    assert packed["zero"].shape == (24, 2)
    assert packed_bytes(packed) == 24 * 128 // 2 + 24 * 2 * (2 + 2)


def test_int4_round_trip_is_within_half_a_quantization_step():
    w = weight(16, 128)
    packed = pack(w, "int4_g32")
    back = unpack(packed, "int4_g32", tuple(w.shape))
    step = packed["scale"].float().repeat_interleave(32, dim=1)
    assert torch.all((back - w).abs() <= step / 2 + 1e-3)
    # and it is not the identity: 16 levels cannot reproduce Gaussian weights
    assert (back - w).abs().max() > 1e-3


@pytest.mark.parametrize(("fmt", "tolerance"), [("int8", 1 / 127), ("fp8_e4m3", 1 / 8), ("bf16", 1 / 128)])
def test_byte_formats_round_trip_within_their_precision(fmt, tolerance):
    w = weight(8, 64)
    back = unpack(pack(w, fmt), fmt, tuple(w.shape))
    rel = ((back - w).abs() / w.abs().amax(dim=1, keepdim=True)).max().item()
    assert 0 < rel <= tolerance


@pytest.mark.parametrize("shape", [(40, 1, 3, 3), (80, 40, 3, 3), (10, 160), (7, 5)])
@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8", "fp8_e4m3", "int4_g64", "int4_g32"])
def test_estimated_bytes_are_the_packed_bytes(shape, fmt):
    w = torch.randn(shape)
    assert estimate_bytes(shape, fmt) == packed_bytes(pack(w, fmt))


def test_fewer_bits_give_fewer_bytes_and_more_error():
    w = weight(64, 256)
    sizes = [estimate_bytes(tuple(w.shape), f) for f in ["fp32", "bf16", "int8", "int4_g64"]]
    errors = [(fake_quant(w, f) - w).pow(2).mean().item() for f in ["bf16", "int8", "int4_g64"]]
    assert sizes == sorted(sizes, reverse=True)
    assert errors == sorted(errors)
    assert format_bits("int4_g64") == 4


def test_the_catalog_names_match_the_light_name_list():
    assert tuple(models.CATALOG) == MODEL_NAMES


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(32, 64)
        self.b = nn.Linear(64, 64)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def fidelity_task(model):
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    task = models.Task(
        name="toy",
        arch="toy",
        model=model,
        kind="fidelity",
        quality_metric="cos",
        default_max_drop=0.01,
        example_inputs=(x[:4],),
        eval_batches=[(x,)],
        calib_batches=[(x,)],
        train_batches=None,
        real_weights=False,
        data_source="random",
    )
    task.set_reference(model)
    return task


def test_sensitivity_ranks_a_layer_with_an_outlier_weight_first():
    model = TwoLayer().eval()
    with torch.no_grad():
        model.b.weight[:, 0] = 0.0
        model.b.weight[3, 0] = 50.0  # one huge weight stretches its row's int8 and its group's int4 grid
    task = fidelity_task(model)
    sens = sensitivity.measure(task, model, ["bf16", "int8", "int4_g16"])
    assert sens["b"]["int4_g16"] > sens["a"]["int4_g16"]
    assert sens["b"]["int8"] > sens["a"]["int8"]
    for layer in ("a", "b"):
        assert sens[layer]["bf16"] < sens[layer]["int8"] < sens[layer]["int4_g16"]
    # measuring must leave the weights as they were
    assert model.b.weight[3, 0].item() == 50.0


def test_greedy_assignment_stays_within_the_budget_and_prefers_cheap_layers():
    model = TwoLayer().eval()
    sens = {
        "a": {"bf16": 0.0001, "int8": 0.001, "int4_g16": 0.004},
        "b": {"bf16": 0.0001, "int8": 0.002, "int4_g16": 0.05},
    }
    moves = sensitivity.greedy_moves(model, sens, budget=0.01)
    assignment = sensitivity.assignment_from(model, moves)
    assert assignment == {"a": "int4_g16", "b": "int8"}
    assert sensitivity.greedy_moves(model, sens, budget=0.0) == []


def test_auto_assignment_is_verified_by_measurement():
    model = TwoLayer().eval()
    task = fidelity_task(model)
    sens = sensitivity.measure(task, model, ["bf16", "int8", "int4_g16"])
    budget = 0.002
    assignment, info = sensitivity.auto_assign(task, model, sens, budget)
    assert info["measured_calib_drop"] <= budget
    assert sensitivity.measured_drop(task, model, assignment, task.calib_score(model)) == pytest.approx(
        info["measured_calib_drop"]
    )
    assert any(f != "fp32" for f in assignment.values())
    # a smaller margin spends less of the budget on calibration data (MiniLM's task uses 0.8)
    tight, info = sensitivity.auto_assign(task, model, sens, budget, margin=0.5)
    assert info["calibration_target"] == pytest.approx(0.5 * budget)
    assert info["measured_calib_drop"] <= 0.5 * budget
    assert info["measured_calib_drop"] <= sensitivity.auto_assign(task, model, sens, budget)[1]["measured_calib_drop"]


class Stack(nn.Module):
    def __init__(self, n=6):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(32, 64)
        self.layers = nn.ModuleList(nn.Linear(64, 64) for _ in range(n))

    def forward(self, x):
        x = self.inp(x)
        for layer in self.layers:
            x = x + torch.tanh(layer(x))
        return x


def test_slack_left_by_overestimated_sensitivities_is_spent_and_measured():
    model = Stack().eval()
    task = fidelity_task(model)
    measured = sensitivity.measure(task, model, ["bf16", "int8", "int4_g16"])
    # summed sensitivities three times too pessimistic: the greedy alone stops far below the budget
    sens = {name: {fmt: 3 * d for fmt, d in by_fmt.items()} for name, by_fmt in measured.items()}
    budget = 0.5 * sum(by_fmt["int4_g16"] for by_fmt in measured.values())
    plain, plain_info = sensitivity.auto_assign(task, model, sens, budget, extend=False)
    extended, info = sensitivity.auto_assign(task, model, sens, budget)
    assert plain_info["extensions"] == []
    assert info["greedy"]["kept"] == plain_info["moves_kept"]
    assert info["extensions"]
    assert info["extensions"][0]["taken"]
    assert sensitivity.assignment_bytes(model, extended) < sensitivity.assignment_bytes(model, plain)
    assert plain_info["measured_calib_drop"] < info["measured_calib_drop"] <= info["calibration_target"]
    base = task.calib_score(model)
    assert sensitivity.measured_drop(task, model, extended, base) == pytest.approx(info["measured_calib_drop"])
    # with the measured sensitivities the extension may find nothing better, but never something bigger
    exact, exact_info = sensitivity.auto_assign(task, model, measured, budget)
    greedy, _ = sensitivity.auto_assign(task, model, measured, budget, extend=False)
    assert sensitivity.assignment_bytes(model, exact) <= sensitivity.assignment_bytes(model, greedy)
    assert exact_info["measured_calib_drop"] <= exact_info["calibration_target"]


def test_preset_puts_qkv_in_fp8_other_linears_in_int4_and_embeddings_in_full_precision():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.query, self.key, self.value, self.dense = (nn.Linear(8, 8) for _ in range(4))

    assert sensitivity.preset(Attn(), 64) == {
        "emb": "fp32",
        "query": "fp8_e4m3",
        "key": "fp8_e4m3",
        "value": "fp8_e4m3",
        "dense": "int4_g64",
    }


def test_nearest_neighbour_agreement_detects_a_swapped_neighbourhood():
    ref = [torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])]
    same = [ref[0] * 2]
    assert models.nn_agreement(same, ref) == 1.0
    assert models.mean_cosine(same, ref) == pytest.approx(1.0)
    moved = [torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]])]
    assert models.nn_agreement(moved, ref) < 1.0


def test_real_sentences_come_from_an_installed_package():
    sentences = models.real_sentences()
    assert len(sentences) >= 100
    assert len(set(sentences)) == len(sentences)
    assert all(40 <= len(s) <= 300 for s in sentences)
    assert math.isclose(sum(s[0].isupper() for s in sentences) / len(sentences), 1.0)


def test_torchao_runs_int8_on_cpu_and_int4_is_simulated_there():
    from workers.compression.quantize import apply_torchao

    model = TwoLayer().eval()
    x = torch.randn(8, 32)
    with torch.no_grad():
        ref = model(x)
    quantized, simulated = apply_torchao(model, {"a": "int8", "b": "int4_g16"}, "cpu")
    assert simulated == ["b"]  # torchao has no CPU int4 packing
    assert type(quantized.a.weight).__name__ == "Int8Tensor"
    with torch.no_grad():
        assert torch.nn.functional.cosine_similarity(quantized(x), ref).mean() > 0.99


def test_torchao_is_used_only_where_it_computes_the_packed_weights():
    from workers.compression.quantize import RTN, apply_torchao, fake_quant, same_grid

    model = TwoLayer().eval()
    image = fake_quant(model.a.weight.detach(), "int8")
    quantized, simulated = apply_torchao(copy.deepcopy(model), {"a": "int8"}, "cpu")
    assert simulated == []  # torchao's int8 grid is the packed format's: executed by torchao
    assert same_grid(quantized.a.weight, image)

    class OffGrid(type(RTN)):
        """A rounding whose image torchao's int8 cannot represent: one outlier per row sets torchao's
        per-row scale so high that the other weights round to 0 (a fake for the check's logic)."""

        def fake_quant(self, layer, w, fmt):  # noqa: ANN001, ANN201
            out = fake_quant(w, fmt).clone()
            out[:, 0] = 1000 * out.abs().mean()
            return out

    off = OffGrid()
    quantized, simulated = apply_torchao(copy.deepcopy(model), {"a": "int8"}, "cpu", off)
    assert simulated == ["a"]  # torchao would compute with other weights than the reported ones
    assert type(quantized.a.weight).__name__ == "Parameter"
