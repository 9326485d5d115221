"""Deploy-time rewrites compute what they replace: the space-to-depth stem, RMSNorm weights folded."""
import pytest
import torch
from torch import nn

from workers.archs import ResNet50
from workers.compression.reparam import SpaceToDepthConv, fold_rmsnorm_weights, space_to_depth_stem


@pytest.mark.parametrize(("kernel", "padding"), [(7, 3), (3, 1), (5, 2), (7, 0)])
@pytest.mark.parametrize("size", [(32, 32), (31, 17), (8, 9)])
@pytest.mark.parametrize("multiple", [1, 8])
def test_a_stride_two_convolution_is_rewritten_exactly(kernel, padding, size, multiple):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, kernel, 2, padding).double()
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    rewritten = SpaceToDepthConv(conv, multiple)
    assert rewritten.conv.in_channels == (12 if multiple == 1 else 16)
    assert rewritten.conv.kernel_size == ((kernel + 1) // 2,) * 2
    assert torch.allclose(rewritten(x), conv(x), atol=1e-12)


def test_resnet50_keeps_its_outputs_with_the_stem_rewritten():
    torch.manual_seed(0)
    model = ResNet50(classes=10).eval().double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    before = model(x)
    assert space_to_depth_stem(model, 8) == 1  # the stem only: every other conv has many input channels
    assert isinstance(model.stem[0], SpaceToDepthConv)
    assert torch.allclose(model(x), before, atol=1e-10)


def test_it_refuses_a_convolution_it_cannot_rewrite():
    with pytest.raises(ValueError, match="stride-2"):
        SpaceToDepthConv(nn.Conv2d(3, 4, 3, 1, 1))


@pytest.mark.parametrize("tied", [False, True])
def test_rmsnorm_weights_folded_into_the_projections_keep_a_llamas_logits(tied):
    """A Llama with non-trivial norm weights (as a trained one has): after the fold every norm is ones,
    the logits are the same, and a tied lm_head gets its own weight (the embedding unchanged). The decode
    step then reads no norm (DecodeLlama's *_unit flags) and gives the same logits."""
    from transformers import LlamaForCausalLM

    from workers.compression.decode import DecodeLlama
    from workers.compression.models import llama_config

    torch.manual_seed(0)
    cfg = llama_config(smoke=True)
    cfg.tie_word_embeddings = tied
    lm = LlamaForCausalLM(cfg).double().eval()
    norms = [m for m in lm.modules() if type(m).__name__ == "LlamaRMSNorm"]
    with torch.no_grad():
        for m in norms:
            m.weight.uniform_(0.2, 3.0)
    ids = torch.randint(0, cfg.vocab_size, (1, 9))
    embed = lm.model.embed_tokens.weight.detach().clone()
    with torch.no_grad():
        before = lm(ids).logits
        reference = DecodeLlama(lm, max_len=16, dtype=torch.float64)
        steps_before = torch.stack([reference(ids[0, i : i + 1], torch.tensor([i])) for i in range(9)])
    assert not reference.norm_unit
    assert fold_rmsnorm_weights(lm) == len(norms)
    assert all(bool((m.weight == 1).all()) for m in norms)
    with torch.no_grad():
        torch.testing.assert_close(lm(ids).logits, before, atol=1e-9, rtol=1e-9)
        dec = DecodeLlama(lm, max_len=16, dtype=torch.float64)
        steps = torch.stack([dec(ids[0, i : i + 1], torch.tensor([i])) for i in range(9)])
    torch.testing.assert_close(steps, steps_before, atol=1e-5, rtol=1e-5)  # the step returns fp32 logits
    assert dec.norm_unit
    assert all(layer.ln1_unit and layer.ln2_unit for layer in dec.layers)
    assert torch.equal(lm.model.embed_tokens.weight, embed)
    assert lm.lm_head.weight.data_ptr() != lm.model.embed_tokens.weight.data_ptr()
    assert fold_rmsnorm_weights(lm) == 0  # nothing left to fold
