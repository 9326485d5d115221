"""A compressed bucket's exchange with its codec work replayed from CUDA graphs.

Eagerly, one int4 bucket between two nodes is about 130 small tensor operations issued from Python (error
feedback, encode, pack, decode and sum, then the same again for the all-gather), some 1 ms of host time a
bucket. On a step bound by kernel launches that host time is step time: on the H200, BERT-base's 17 buckets
cost about 18 ms a step with no network at all (`bench/hcof_host_cost.py`). Here the operations between two
collectives are captured once into a CUDA graph and replayed each step, so a bucket costs three graph
launches and its collectives:

    [intra-node reduce-scatter, plain]            collective (when the node has several processes)
    G1: error feedback + encode + pack            graph
    all-to-all of the compressed pieces           collective
    G2: decode + sum, error feedback + encode     graph
    all-gather of the compressed sums             collective
    G3: decode                                    graph
    [intra-node all-gather, plain]                collective

It computes exactly what the eager path computes (`LevelExchanger.reduce_scatter` / `all_gather` with the
same codec), keeps its residuals in the same `ErrorFeedback` slots (so checkpoints are the same), counts the
same bytes and times each level with events around its part. Used for: CUDA, NCCL on every level in use, at
most one plain intra-node level and one compressed outer level with an element-wise codec.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .codecs import Codec, Plain, PowerSGD, wire_bytes
from .collectives import LevelExchanger, _all_gather, _pack, _reduce_scatter, _unpack
from .topology import LEVELS


def graphable_levels(ex: LevelExchanger, codecs: dict[str, Codec]):
    """(intra, outer) level groups when this exchange can run from graphs, else None."""
    used = [lv for lv in LEVELS if lv in ex.groups and ex.groups[lv].size > 1]
    if ex.device.type != "cuda" or not used or len(used) > 2:
        return None
    if any(ex.groups[lv].backend != "nccl" for lv in used):
        return None
    if len(used) == 2 and (used[0] != "intra_node" or not isinstance(codecs["intra_node"], Plain)):
        return None
    codec = codecs[used[-1]]
    if not codec.lossy or not codec.elementwise or isinstance(codec, PowerSGD):
        return None
    return (ex.groups["intra_node"] if len(used) == 2 else None), ex.groups[used[-1]]


class GraphedExchange:
    """`capture=False` runs the same three stages eagerly each step, on any device and backend: the selfcheck
    runs it on gloo processes against the eager exchange, which checks the multi-rank data flow (buffers,
    layouts, collectives, bytes) on CPU; tests/gpu checks that the captured graphs compute the same."""

    def __init__(self, ex: LevelExchanger, flat: torch.Tensor, codec: Codec, outer, intra, key: str,
                 pool, capture: bool = True) -> None:
        self.ex, self.flat, self.codec, self.outer, self.intra, self.key, self.pool = (
            ex, flat, codec, outer, intra, key, pool)
        n = outer.size
        p = intra.size if intra else 1
        self.piece = flat.new_empty(flat.numel() // p) if intra else flat
        self.m = self.piece.numel() // n
        self.rs_slot = f"{key}/{outer.level}/rs"
        self.ag_slot = f"{key}/{outer.level}/ag"
        ef = ex.ef.residuals
        if codec.error_feedback:  # the graphs update these in place: they must exist before the capture
            ef.setdefault(self.rs_slot, torch.zeros(n, self.m, device=flat.device))
            ef.setdefault(self.ag_slot, torch.zeros(1, self.m, device=flat.device))
        self.res_rs = ef.get(self.rs_slot)
        self.res_ag = ef.get(self.ag_slot)
        self.graphs = None
        if capture:
            self._capture()

    # -- the three graphs -----------------------------------------------------------------------------
    def _compress(self, x: torch.Tensor, res: torch.Tensor | None) -> dict:
        if res is None:
            return self.codec.encode(x)
        corrected = x + res
        wire = self.codec.encode(corrected)
        torch.sub(corrected, self.codec.decode(wire, x.shape[1]), out=res)
        return wire

    def _g1(self) -> None:
        wire = self._compress(self.piece.view(self.outer.size, self.m), self.res_rs)
        self.rs_layout_bytes = wire_bytes(wire)
        self.send_rs, self.layout_rs = _pack(wire, self.outer.size)

    def _g2(self) -> None:
        summed = self.codec.decode(_unpack(self.recv_rs, self.layout_rs), self.m).sum(dim=0)
        wire = self._compress(summed.view(1, self.m), self.res_ag)
        self.ag_layout_bytes = wire_bytes(wire)
        self.send_ag, self.layout_ag = _pack(wire, 1)

    def _g3(self) -> None:
        out = self.codec.decode(_unpack(self.recv_ag, self.layout_ag), self.m).reshape(-1)
        self.piece.copy_(out)

    def _capture(self) -> None:
        side = torch.cuda.Stream(self.flat.device)
        side.wait_stream(torch.cuda.current_stream(self.flat.device))
        self.graphs = []
        with torch.cuda.stream(side):
            for i, fn in enumerate((self._g1, self._g2, self._g3)):
                g = torch.cuda.CUDAGraph()
                # thread_local: the backward pass goes on launching kernels from its own thread meanwhile.
                g.capture_begin(pool=self.pool, capture_error_mode="thread_local")
                try:
                    fn()
                finally:
                    g.capture_end()
                self.graphs.append(g)
                self._receive_buffers(i)
        torch.cuda.current_stream(self.flat.device).wait_stream(side)

    def _receive_buffers(self, stage: int) -> None:
        """The output buffer of the collective that follows `stage` (plain buffers the next graph reads)."""
        if stage == 0:
            self.recv_rs = torch.empty_like(self.send_rs)
        elif stage == 1:
            self.recv_ag = self.send_ag.new_empty((self.outer.size, self.send_ag.shape[1]))

    def _stage(self, i: int) -> None:
        if self.graphs is not None:
            self.graphs[i].replay()
            return
        (self._g1, self._g2, self._g3)[i]()
        self._receive_buffers(i)

    # -- one step -------------------------------------------------------------------------------------
    def run(self) -> torch.Tensor:
        ex, outer = self.ex, self.outer
        if self.intra:
            with ex.timed("intra_node"):
                _reduce_scatter(self.piece, self.flat, group=self.intra.group)
                ex.bytes["intra_node"] += self.flat.numel() * 4 * (self.intra.size - 1) // self.intra.size
        with ex.timed(outer.level):
            self._stage(0)
            dist.all_to_all_single(self.recv_rs, self.send_rs, group=outer.group)
            self._stage(1)
            _all_gather(self.recv_ag, self.send_ag, group=outer.group)
            self._stage(2)
            ex.bytes[outer.level] += (self.rs_layout_bytes * (outer.size - 1) // outer.size
                                      + self.ag_layout_bytes * (outer.size - 1))
        if self.intra:
            with ex.timed("intra_node"):
                _all_gather(self.flat, self.piece, group=self.intra.group)
                ex.bytes["intra_node"] += self.piece.numel() * 4 * (self.intra.size - 1)
        return self.flat
