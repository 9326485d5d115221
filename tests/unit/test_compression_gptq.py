"""GPTQ rounding of int4 Linear weights: the packed format, RTN as its special case, and what it buys."""

import torch
from torch import nn

from workers.compression.gptq import collect_hessians, gptq_int4
from workers.compression.quantize import Rounding, pack, unpack


def correlated_inputs(n=2048, dim=256, seed=0):
    """Inputs whose features are strongly correlated, as activations are (a random mixing of few factors)."""
    g = torch.Generator().manual_seed(seed)
    factors = torch.randn(n, 32, generator=g)
    return factors @ torch.randn(32, dim, generator=g) + 0.1 * torch.randn(n, dim, generator=g)


def test_with_an_identity_hessian_gptq_is_round_to_nearest_exactly():
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(1))
    got, want = gptq_int4(w, torch.eye(256), 64), pack(w, "int4_g64")
    assert set(got) == set(want) == {"q", "scale", "zero"}
    for key in want:
        assert got[key].dtype == want[key].dtype
        assert torch.equal(got[key], want[key]), key


def test_gptq_moves_the_layers_outputs_less_than_round_to_nearest():
    x = correlated_inputs()
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(2))
    hessian = x.T @ x
    gptq = unpack(gptq_int4(w, hessian, 64), "int4_g64", tuple(w.shape))
    rtn = unpack(pack(w, "int4_g64"), "int4_g64", tuple(w.shape))
    out_err = lambda q: (x @ (q - w).T).pow(2).mean().item()  # noqa: E731
    assert out_err(gptq) < 0.5 * out_err(rtn)
    # It trades weight error for output error: the weights themselves move more.
    assert (gptq - w).pow(2).mean() > (rtn - w).pow(2).mean()


def test_hessians_are_the_gram_matrices_of_each_linear_layers_inputs():
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    x = torch.randn(10, 8, generator=torch.Generator().manual_seed(3))
    hess = collect_hessians(dict(model.named_modules()), lambda: model(x))
    assert set(hess) == {"0", "2"}
    torch.testing.assert_close(hess["0"], x.T @ x)
    hidden = torch.relu(model[0](x)).detach()
    torch.testing.assert_close(hess["2"], hidden.T @ hidden, atol=1e-5, rtol=1e-5)
    assert not model[0]._forward_hooks  # the hooks are gone


def test_rounding_uses_gptq_only_for_int4_layers_it_has_a_hessian_for_and_caches_it():
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(4))
    x = correlated_inputs(512, 128)
    rounding = Rounding({"a": x.T @ x})
    assert rounding.name == "gptq"
    assert torch.equal(rounding.pack("b", w, "int4_g64")["q"], pack(w, "int4_g64")["q"])  # no Hessian: RTN
    assert torch.equal(rounding.pack("a", w, "int8")["q"], pack(w, "int8")["q"])  # int8: RTN
    first = rounding.pack("a", w, "int4_g64")
    assert not torch.equal(first["q"], pack(w, "int4_g64")["q"])
    assert rounding.pack("a", w, "int4_g64") is first
    assert Rounding().name == "rtn"


def _task(train_is_calib):
    from workers.compression.models import Task

    calib = [(torch.full((2, 3), float(i)),) for i in range(3)]

    def train(seed):
        i = 0
        while True:
            yield (torch.full((2, 3), 100.0 + i),), None
            i += 1

    return Task(
        name="t", arch="t", model=nn.Linear(3, 2), kind="fidelity", quality_metric="q", default_max_drop=0.01,
        example_inputs=calib[0], eval_batches=calib, calib_batches=calib, train_batches=train,
        real_weights=False, data_source="d", reference_calib=[torch.zeros(2, 2) + i for i in range(3)],
        train_is_calib=train_is_calib,
    )


def test_gptq_is_fitted_on_inputs_the_sensitivities_are_not_measured_on():
    fit, scored = _task(train_is_calib=False).gptq_split(batches=4)
    assert [b[0][0, 0].item() for b in fit] == [100.0, 101.0, 102.0, 103.0]  # the training batches
    assert len(scored.calib_batches) == 3
    task = _task(train_is_calib=True)
    fit, scored = task.gptq_split()
    assert [b[0][0, 0].item() for b in fit] == [0.0]
    assert [b[0][0, 0].item() for b in scored.calib_batches] == [1.0, 2.0]
    assert [r[0, 0].item() for r in scored.reference_calib] == [1.0, 2.0]
    assert len(task.calib_batches) == 3  # the task itself is unchanged
    task.calib_batches = task.calib_batches[:1]
    assert task.gptq_split() == ([], task)  # nothing to spare: no GPTQ


def test_an_input_the_fitting_data_never_used_is_rounded_to_nearest_not_dropped():
    x = correlated_inputs(512, 128)
    x[:, 5] = 0.0
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(6))
    got = unpack(gptq_int4(w, x.T @ x, 64), "int4_g64", tuple(w.shape))
    rtn_step = (w[:, :64].amax(1) - w[:, :64].amin(1)) / 15
    assert ((got[:, 5] - w[:, 5]).abs() <= rtn_step * 0.5 + 1e-3).all()
