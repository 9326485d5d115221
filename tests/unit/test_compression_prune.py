"""Structured pruning: Torch-Pruning removes channels for real, importance accumulates |w·g| per step."""

import torch
import torch_pruning as tp
from torch import nn

from workers.compression import models
from workers.compression.prune import AccumulatedTaylorImportance, kept_fractions, param_count, prune

torch.set_num_threads(1)  # the test machine is small and shared


def test_pruning_the_digits_cnn_removes_channels_and_halves_its_parameters():
    task = models.make_task("digits-cnn")
    original = task.model
    pruned, info = prune(task, original, keep_ratio=0.7, steps=2, taylor_batches=2, recovery_steps=20)
    convs = [m for m in pruned.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [28, 56, 56]
    assert pruned.classifier[1].in_features == 56 * 4  # DepGraph followed the flatten into the Linear
    assert pruned.classifier[-1].out_features == 10  # the class outputs were left alone
    assert param_count(original) / param_count(pruned) >= 2.0
    assert kept_fractions(original, pruned)["features.2"] == 0.7
    x = task.eval_batches[0][0][:5]
    assert pruned(x).shape == (5, 10)
    # the original is untouched: pruning works on a copy
    assert original.features[0].out_channels == 40
    assert info["iterative_steps"] == 2


def test_accumulated_taylor_importance_sums_absolute_terms_across_steps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    x = torch.randn(8, 4)
    imp = AccumulatedTaylorImportance()
    rows = torch.zeros(6)  # first layer's output rows
    cols = torch.zeros(6)  # second layer's input columns, pruned with them
    for target in (0, 1):  # two steps with different losses, so the per-step terms differ
        model.zero_grad()
        model(x)[:, target].sum().backward()
        imp.accumulate(model)
        rows += (model[0].weight * model[0].weight.grad).abs().sum(1).detach()
        cols += (model[2].weight * model[2].weight.grad).abs().sum(0).detach()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    group = graph.get_pruning_group(model[0], tp.prune_linear_out_channels, idxs=list(range(6)))
    expected = (rows + cols) / 2
    expected = expected / expected.mean()
    assert torch.allclose(imp(group), expected, atol=1e-5)
    # Torch-Pruning's own score reads only the last step's gradient, which ranks differently here
    single = tp.importance.GroupTaylorImportance(group_reduction="mean", normalizer="mean")(group)
    assert not torch.allclose(single, expected, atol=1e-3)
    # the weights were put back after scoring
    assert model[0].weight.abs().min() < 1.0
    assert not torch.all(model[0].weight == 1)


def test_a_residual_block_whose_branch_outputs_zero_is_exactly_the_identity():
    from workers.archs import ResNet50
    from workers.compression.prune import removable_blocks

    torch.manual_seed(0)
    model = ResNet50(classes=10).eval()
    names = [n for n, _ in removable_blocks(model)]
    assert len(names) == 12  # 2 + 3 + 5 + 2: every bottleneck but the first of each stage
    block = dict(model.named_modules())["blocks.5"]
    with torch.no_grad():
        block.bn3.weight.zero_()
        block.bn3.bias.zero_()
    x = torch.randn(2, 3, 64, 64)
    before = model(x)
    model.blocks[5] = nn.Identity()
    assert torch.allclose(model(x), before, atol=1e-6)


def test_depth_pruning_drops_the_least_important_blocks_per_mac_then_prunes_channels():
    from workers.compression.artifact import layer_shapes, resize_to
    from workers.compression.prune import removable_blocks

    task = models.make_task("resnet50")
    task.example_inputs = (torch.randn(1, 3, 64, 64),)
    task.train_batches = lambda seed: iter([((torch.randn(2, 3, 64, 64),), None)] * 100)
    original = task.model
    pruned, info = prune(task, original, keep_ratio=0.75, steps=1, taylor_batches=2, recovery_steps=0,
                         round_to=8, drop=4)
    scores = info["block_scores"]
    assert len(scores) == 12
    assert sum(s["importance"] for s in scores.values()) > 0.99  # shares of the total
    # blocks.1 (stage 1, 256 -> 64 -> 64 -> 256 channels) on 16 x 16 maps of a 64 x 64 input: 1x1, 3x3, 1x1.
    assert scores["blocks.1"]["macs"] == 16 * 16 * (256 * 64 + 64 * 64 * 9 + 64 * 256)
    dropped = info["dropped_blocks"]
    assert len(dropped) == 4
    order = sorted(scores, key=lambda n: scores[n]["per_gmac"])
    assert set(dropped) == set(order[:4])  # the lowest importance per MAC went
    modules = dict(pruned.named_modules())
    assert all(isinstance(modules[n], nn.Identity) for n in dropped)
    assert len(removable_blocks(pruned)) == 8
    assert param_count(pruned) < 0.75 * param_count(original)
    assert pruned(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    # The original keeps its blocks; a fresh architecture rebuilt from the manifest's shapes takes the weights.
    assert len(removable_blocks(original)) == 12
    rebuilt = resize_to(models.build_architecture("resnet50"), layer_shapes(pruned))
    rebuilt.load_state_dict(pruned.state_dict())
    x = torch.randn(1, 3, 64, 64)
    assert torch.allclose(rebuilt.eval()(x), pruned(x), atol=1e-5)
