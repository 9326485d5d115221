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


@pytest.mark.parametrize("codec_name", ["int4", "int8", "topk:0.05", "bf16"])
def test_graphed_rounds_equal_eager_rounds(one_rank_nccl, codec_name):
    from workers.training.hcof.codecs import CHUNK, parse_codec
    from workers.training.hcof.collectives import LevelExchanger
    from workers.training.hcof.graphed import GraphedExchange
    from workers.training.hcof.topology import LevelGroup

    device = torch.device("cuda", 0)
    codec = parse_codec(codec_name)

    def exchanger():
        groups = {"intra_node": LevelGroup("intra_node", None, 1, 0, "nccl"),
                  "inter_node": LevelGroup("inter_node", one_rank_nccl, 1, 0, "nccl"),
                  "cross_rack": LevelGroup("cross_rack", None, 1, 0, "nccl")}
        return LevelExchanger(groups, device)

    gen = torch.Generator(device="cpu").manual_seed(0)
    xs = [torch.randn(64 * CHUNK, generator=gen).to(device) for _ in range(5)]
    eager_ex, graph_ex = exchanger(), exchanger()
    lg_e, lg_g = eager_ex.groups["inter_node"], graph_ex.groups["inter_node"]
    eager_out = []
    for x in xs:
        eager_out.append(eager_ex.all_gather(eager_ex.reduce_scatter(x.clone(), lg_e, codec, "b0"), lg_e, codec, "b0"))
    flat = torch.empty_like(xs[0])
    # Round 1 eager, as in the reducer (it creates the residuals), then captured graphs for the rest.
    flat.copy_(xs[0])
    first = graph_ex.all_gather(graph_ex.reduce_scatter(flat, lg_g, codec, "b0"), lg_g, codec, "b0")
    torch.testing.assert_close(first, eager_out[0], rtol=0, atol=0)
    graphed = GraphedExchange(graph_ex, flat, codec, lg_g, None, "b0", torch.cuda.graph_pool_handle())
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
