"""Topology, critical tensors, command-line checks and the DDP byte model: everything decided before a rank starts."""
from __future__ import annotations

import json

import pytest
from torch import nn

from workers.training.__main__ import main
from workers.training.hcof.critical import CriticalPolicy, classify
from workers.training.hcof.topology import Topology, TopologyError
from workers.training.projection import ddp_bytes_by_level, ring_link_levels


def test_levels_group_ranks_by_node_by_local_index_and_across_racks():
    topo = Topology.emulated(nodes=4, procs_per_node=2, racks=2)
    assert topo.world_size == 8
    assert topo.level_groups("intra_node") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    # One inter-node group per local index inside each rack; cross-rack pairs the same position in each rack.
    assert topo.level_groups("inter_node") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert topo.level_groups("cross_rack") == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_emulated_nodes_take_distinct_gpus_of_the_host():
    topo = Topology.emulated(nodes=2, procs_per_node=2)
    assert [topo.gpu_of(r) for r in range(4)] == [0, 1, 2, 3]


def test_an_allocation_from_the_dispatcher_keeps_its_gpu_indices_and_racks():
    spec = {"nodes": [{"name": "gpu-a", "rack": "r1", "gpus": [2, 3]}, {"name": "gpu-b", "rack": "r2", "gpus": [0, 1]}]}
    topo = Topology.from_spec(json.dumps(spec))
    assert topo.world_size == 4
    assert len(topo.racks) == 2
    assert topo.gpu_of(1) == 3
    assert topo.place(2).node == 1
    assert topo.level_groups("cross_rack") == [[0, 2], [1, 3]]


def test_it_rejects_nodes_with_different_process_counts():
    with pytest.raises(TopologyError, match="same non-zero number"):
        Topology.from_spec({"nodes": [{"name": "a", "gpus": [0, 1]}, {"name": "b", "gpus": [0]}]})


def test_biases_norms_embeddings_and_small_tensors_are_critical():
    model = nn.Sequential(nn.Embedding(100, 16), nn.Linear(16, 64), nn.LayerNorm(64), nn.Linear(64, 8))
    kinds = classify(model, CriticalPolicy.parse("bias,norm,embedding,small:1024"))
    by_name = {name: kinds[id(p)] for name, p in model.named_parameters()}
    assert by_name == {"0.weight": "embedding", "1.weight": "compressed", "1.bias": "critical", "2.weight": "critical",
                       "2.bias": "critical", "3.weight": "critical", "3.bias": "critical"}
    relaxed = classify(model, CriticalPolicy.parse("bias,small:0"))
    assert relaxed[id(model[0].weight)] == "compressed"
    assert relaxed[id(model[2].weight)] == "critical"


def test_a_flat_ring_over_two_nodes_of_two_crosses_nodes_on_half_its_links():
    assert ring_link_levels(Topology.emulated(2, 2)) == {"intra_node": 2, "inter_node": 2, "cross_rack": 0}
    model = nn.Linear(100, 10)  # 1,010 fp32 values
    per_link = 2 * 3 * 1010 * 4 // 4
    assert ddp_bytes_by_level(model, Topology.emulated(2, 2), "none")["inter_node"] == 2 * per_link
    assert ddp_bytes_by_level(model, Topology.emulated(2, 2), "bf16")["inter_node"] == per_link


@pytest.mark.parametrize(("args", "message"), [
    (["--nodes", "2", "--procs-per-node", "2", "--topology", '{"nodes": [{"name": "a", "gpus": [0, 1, 2]}]}'],
     "does not match the topology"),
    (["--hcof", "inter_node=zstd"], "unknown codec"),
    (["--hcof", "inter_node=topk:0"], "(0, 1]"),
    (["--hcof", "inter_node=topk:1.5"], "(0, 1]"),
    (["--hcof", "between_planets=int4"], "LEVEL=CODEC"),
    (["--hcof", "critical=int4"], "never compressed lossily"),
    (["--hcof", "intra_node=powersgd:4,inter_node=int4"], "outermost"),
    (["--ddp-hook", "bf16", "--hcof", "inter_node=int4"], "--hcof off"),
    (["--nodes", "3", "--racks", "2"], "evenly"),
    (["--model", "llama"], "invalid choice"),
    (["--codec-graphs", "maybe"], "invalid choice"),
    (["--lr-warmup", "-1"], "--lr-warmup must be 0 or more"),
    (["--lr", "0"], "--lr must be a positive number"),
])
def test_bad_input_is_one_line_and_exit_status_2(args, message, capsys):
    base = ["--model", "digits-mlp", "--nodes", "2", "--procs-per-node", "2", "--backend", "gloo"]
    assert main(base + args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("error: ")
    assert message in err


def test_a_launcher_world_size_that_disagrees_with_the_topology_is_refused(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    assert main(["--model", "digits-mlp", "--nodes", "2", "--procs-per-node", "2"]) == 2
    assert "world size 3" in capsys.readouterr().err
