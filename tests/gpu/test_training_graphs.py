"""HCOF's CUDA-graph exchange computes what the eager exchange computes (skipped without CUDA).

One process, a one-rank NCCL group standing in for the inter-node level: the collectives are real NCCL calls
(identities on one rank), the codec work is the same. Several rounds, so that error feedback carries over."""
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def one_rank_nccl():
    import torch.distributed as dist

    torch.cuda.set_device(0)
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=torch.device("cuda", 0))
    yield dist.group.WORLD
    dist.destroy_process_group()


@pytest.mark.parametrize(("codec_name", "with_intra"), [
    ("int4", False), ("int8", False), ("topk:0.05", False), ("bf16", False),
    ("int4", True),  # with the plain intra-node reduce-scatter and all-gather around the compressed level
])
def test_graphed_rounds_equal_eager_rounds(one_rank_nccl, codec_name, with_intra):
    from workers.training.hcof.codecs import CHUNK, parse_codec
    from workers.training.hcof.collectives import LevelExchanger
    from workers.training.hcof.graphed import GraphedExchange
    from workers.training.hcof.topology import LevelGroup

    device = torch.device("cuda", 0)
    codec = parse_codec(codec_name)

    def exchanger():
        intra_group = one_rank_nccl if with_intra else None
        groups = {"intra_node": LevelGroup("intra_node", intra_group, 1, 0, "nccl"),
                  "inter_node": LevelGroup("inter_node", one_rank_nccl, 1, 0, "nccl"),
                  "cross_rack": LevelGroup("cross_rack", None, 1, 0, "nccl")}
        return LevelExchanger(groups, device)

    gen = torch.Generator(device="cpu").manual_seed(0)
    xs = [torch.randn(64 * CHUNK, generator=gen).to(device) for _ in range(5)]
    eager_ex, graph_ex = exchanger(), exchanger()
    lg_e, lg_g = eager_ex.groups["inter_node"], graph_ex.groups["inter_node"]
    intra_e, intra_g = eager_ex.groups["intra_node"], graph_ex.groups["intra_node"]

    def eager_round(ex, lg, intra, x):
        from workers.training.hcof.codecs import Plain

        piece = ex.reduce_scatter(x, intra, Plain("none"), "b0") if with_intra else x
        out = ex.all_gather(ex.reduce_scatter(piece, lg, codec, "b0"), lg, codec, "b0")
        return ex.all_gather(out, intra, Plain("none"), "b0") if with_intra else out

    eager_out = [eager_round(eager_ex, lg_e, intra_e, x.clone()) for x in xs]
    flat = torch.empty_like(xs[0])
    # Round 1 eager, as in the reducer (it creates the residuals), then captured graphs for the rest.
    flat.copy_(xs[0])
    first = eager_round(graph_ex, lg_g, intra_g, flat)
    torch.testing.assert_close(first, eager_out[0], rtol=0, atol=0)
    graphed = GraphedExchange(graph_ex, flat, codec, lg_g, intra_g if with_intra else None, "b0",
                              torch.cuda.graph_pool_handle())
    for x, want in zip(xs[1:], eager_out[1:], strict=True):
        flat.copy_(x)
        got = graphed.run().clone()
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for slot, res in eager_ex.ef.residuals.items():
        torch.testing.assert_close(graph_ex.ef.residuals[slot], res, rtol=0, atol=0)
    if codec.error_feedback:
        assert set(graph_ex.ef.residuals) == {"b0/inter_node/rs", "b0/inter_node/ag"}
    torch.cuda.synchronize()
    graph_ex.resolve_times()
    assert graph_ex.seconds["inter_node"] > 0  # the graphed rounds are timed on the level they run at
