"""The space-to-depth stem rewrite computes exactly what the convolution it replaces computes."""
import pytest
import torch
from torch import nn

from workers.archs import ResNet50
from workers.compression.reparam import SpaceToDepthConv, space_to_depth_stem


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
