"""Per-level exchanges that keep compressed gradients compressed on the wire, and count what they send.

Every function sums (the caller pre-divides by the world size). Bytes are what this rank hands to the
collective for its peers, as a ring or pairwise algorithm sends them: (n-1)/n of a reduce-scatter or
all-to-all input, (n-1) copies of an all-gather piece, 2(n-1)/n of an all-reduce input.
"""
from __future__ import annotations

import time
import zlib
from contextlib import contextmanager

import torch
import torch.distributed as dist

from .codecs import CHUNK, Codec, ErrorFeedback, Plain, PowerSGD, Wire, wire_bytes
from .topology import LevelGroup

# torch 2.13 renamed the tensor forms; the GPU hosts run 2.11, which has only the old names.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class LevelExchanger:
    def __init__(self, groups: dict[str, LevelGroup], device: torch.device) -> None:
        self.groups = groups
        self.device = device
        self.ef = ErrorFeedback()
        self.bytes: dict[str, int] = {level: 0 for level in groups}
        self.seconds: dict[str, float] = {level: 0.0 for level in groups}
        self._powersgd_q: dict[str, torch.Tensor] = {}
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    # -- plumbing -------------------------------------------------------------------------------
    @contextmanager
    def timed(self, level: str):
        if self.device.type == "cuda":
            # NCCL returns before the bytes move. Events on the stream time the level on the GPU without making
            # the host wait; `resolve_times` adds them up once the caller has waited for the stream anyway.
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._events.append((level, start, end))
            return
        began = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[level] += time.perf_counter() - began

    def resolve_times(self) -> float:
        """Add the timed GPU intervals to `seconds` (call after the stream they ran on was synchronized);
        returns their sum."""
        total = 0.0
        for level, start, end in self._events:
            s = start.elapsed_time(end) / 1000.0
            self.seconds[level] += s
            total += s
        self._events.clear()
        return total

    def _staged(self, lg: LevelGroup, t: torch.Tensor) -> torch.Tensor:
        # gloo between nodes while the gradients live on a GPU: the bytes cross through host memory.
        return t.cpu() if lg.backend == "gloo" and t.is_cuda else t

    def _back(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, non_blocking=False) if t.device != self.device else t

    def _all_to_all(self, lg: LevelGroup, wire: Wire) -> Wire:
        """Row i of every tensor goes to peer i; all of a wire's tensors travel in one collective."""
        packed, layout = _pack(wire, lg.size)
        src = self._staged(lg, packed)
        dst = torch.empty_like(src)
        dist.all_to_all_single(dst, src, group=lg.group)
        self.bytes[lg.level] += wire_bytes(wire) * (lg.size - 1) // lg.size
        return _unpack(self._back(dst), layout)

    def _gather(self, lg: LevelGroup, wire: Wire) -> Wire:
        """Every rank's wire, stacked along the first dimension; one collective for all its tensors."""
        packed, layout = _pack(wire, 1)
        src = self._staged(lg, packed)
        dst = src.new_empty((lg.size, src.shape[1]))
        _all_gather(dst, src, group=lg.group)
        self.bytes[lg.level] += wire_bytes(wire) * (lg.size - 1)
        return _unpack(self._back(dst), layout)

    def _all_reduce(self, lg: LevelGroup, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        src = self._staged(lg, t.contiguous())
        dist.all_reduce(src, op=op, group=lg.group)
        self.bytes[lg.level] += src.numel() * src.element_size() * 2 * (lg.size - 1) // lg.size
        return self._back(src)

    # -- the three shapes of exchange -----------------------------------------------------------------
    def reduce_scatter(self, x: torch.Tensor, lg: LevelGroup, codec: Codec, key: str) -> torch.Tensor:
        """x (n*m,) -> this rank's (m,) piece of the sum over the group."""
        n = lg.size
        m = x.numel() // n
        with self.timed(lg.level):
            if isinstance(codec, Plain):
                src = self._staged(lg, x)
                out = src.new_empty(m)
                _reduce_scatter(out, src, group=lg.group)
                self.bytes[lg.level] += x.numel() * x.element_size() * (n - 1) // n
                return self._back(out)
            if isinstance(codec, PowerSGD):
                return self._powersgd(x, lg, codec, key).view(n, m)[lg.rank].clone()
            wire = self.ef.compress(f"{key}/{lg.level}/rs", codec, x.view(n, m))
            received = self._all_to_all(lg, wire)
            return codec.decode(received, m).sum(dim=0)

    def all_gather(self, piece: torch.Tensor, lg: LevelGroup, codec: Codec, key: str) -> torch.Tensor:
        """(m,) per rank -> (n*m,) with every rank's piece; lossy codecs replace this rank's piece too,
        so that every replica applies exactly the same update."""
        m = piece.numel()
        with self.timed(lg.level):
            if isinstance(codec, Plain):
                return self._gather(lg, {"v": piece})["v"]
            if isinstance(codec, PowerSGD):
                raise ValueError("powersgd only runs as the outermost level's all-reduce")
            wire = self.ef.compress(f"{key}/{lg.level}/ag", codec, piece.view(1, m))
            gathered = self._gather(lg, wire)
            return codec.decode(gathered, m).reshape(-1)

    def all_reduce(self, x: torch.Tensor, lg: LevelGroup, codec: Codec, key: str) -> torch.Tensor:
        if isinstance(codec, Plain):
            with self.timed(lg.level):
                return self._all_reduce(lg, x)
        if isinstance(codec, PowerSGD):
            with self.timed(lg.level):
                return self._powersgd(x, lg, codec, key)
        return self.all_gather(self.reduce_scatter(x, lg, codec, key), lg, codec, key)

    # -- PowerSGD ---------------------------------------------------------------------------------
    def _powersgd(self, x: torch.Tensor, lg: LevelGroup, codec: PowerSGD, key: str) -> torch.Tensor:
        cols = CHUNK
        rows = x.numel() // cols
        r = min(codec.rank, rows, cols)
        slot = f"{key}/{lg.level}/psgd"
        res = self.ef.residuals.get(slot)
        matrix = (x + res if res is not None else x.clone()).view(rows, cols)
        q = self._powersgd_q.get(slot)
        if q is None:
            # Every rank must start from the same Q: seed it from the slot's name, not from global RNG.
            gen = torch.Generator().manual_seed(zlib.crc32(slot.encode()))
            q = torch.randn(cols, r, generator=gen).to(self.device)
        p = self._all_reduce(lg, matrix @ q)
        p = torch.linalg.qr(p).Q
        q = self._all_reduce(lg, matrix.t() @ p)
        self._powersgd_q[slot] = q
        approx = p @ q.t()
        self.ef.residuals[slot] = (matrix - approx / lg.size).reshape(-1)
        return approx.reshape(-1)

    # -- exact row-sparse exchange (embedding gradients touch only the rows of the tokens seen) ---------
    def sparse_rows_all_reduce(self, x: torch.Tensor, lg: LevelGroup, codec: Codec, cols: int) -> torch.Tensor:
        rows = x.view(-1, cols)
        with self.timed(lg.level):
            present = rows.ne(0).any(dim=1).nonzero().squeeze(1)
            count = self._all_reduce(lg, torch.tensor([present.numel()], device=self.device),
                                     op=dist.ReduceOp.MAX)
            most = int(count.item())
            value_bytes = 2 if codec.name == "bf16" else 4
            sparse_cost = (lg.size - 1) * most * (cols * value_bytes + 8)
            dense_cost = 2 * (lg.size - 1) * rows.numel() * value_bytes // lg.size
            if sparse_cost >= dense_cost:
                dense = rows.to(torch.bfloat16) if value_bytes == 2 else rows
                return self._all_reduce(lg, dense).float().reshape(-1)
            idx = torch.zeros(most, dtype=torch.int64, device=self.device)
            idx[: present.numel()] = present
            vals = rows.index_select(0, idx)
            vals[present.numel():] = 0  # padding rows add nothing to row 0
            if value_bytes == 2:
                vals = vals.to(torch.bfloat16)
            got = self._gather(lg, {"idx": idx.view(1, most), "val": vals.view(1, most, cols)})
            out = torch.zeros_like(rows)
            out.index_add_(0, got["idx"].reshape(-1), got["val"].reshape(-1, cols).float())
            return out.reshape(-1)


def _pack(wire: Wire, rows: int) -> tuple[torch.Tensor, list]:
    """A wire's tensors as one (rows, bytes) byte matrix: row i holds row i of each tensor's (rows, -1) view.
    One collective then carries values and scales (or indices and values) together, which halves the
    per-collective latency that dominates slow links."""
    if len(wire) == 1:
        (name, t), = wire.items()
        return t.contiguous().reshape(rows, -1), [(name, None, t.dtype, t.shape)]
    parts, layout = [], []
    for name, t in wire.items():
        b = t.contiguous().reshape(rows, -1).view(torch.uint8)
        parts.append(b)
        layout.append((name, b.shape[1], t.dtype, t.shape))
    return torch.cat(parts, dim=1), layout


def _unpack(packed: torch.Tensor, layout: list) -> Wire:
    """The inverse of `_pack` on what came back: each tensor keeps its shape, with the first dimension scaled
    by how many rows came back for each one sent (an all-gather returns one row per rank)."""
    out: Wire = {}
    if layout[0][1] is None:  # one tensor: sent as it is, no byte view
        name, _, _, shape = layout[0]
        return {name: packed.reshape(-1, *shape[1:])}
    offset = 0
    for name, width, dtype, shape in layout:
        piece = packed[:, offset: offset + width].contiguous().view(dtype)
        offset += width
        out[name] = piece.reshape(-1, *shape[1:])
    return out


def hierarchical_all_reduce(ex: LevelExchanger, x: torch.Tensor, codecs: dict[str, Codec], key: str) -> torch.Tensor:
    """Reduce-scatter down the levels, all-reduce at the outermost, all-gather back up (sums)."""
    levels = [lv for lv in ("intra_node", "inter_node", "cross_rack") if lv in ex.groups and ex.groups[lv].size > 1]
    if not levels:
        return x
    for lv in levels[:-1]:
        x = ex.reduce_scatter(x, ex.groups[lv], codecs[lv], key)
    x = ex.all_reduce(x, ex.groups[levels[-1]], codecs[levels[-1]], key)
    for lv in reversed(levels[:-1]):
        x = ex.all_gather(x, ex.groups[lv], codecs[lv], key)
    return x


def sparse_rows_hierarchical(ex: LevelExchanger, x: torch.Tensor, codec: Codec, cols: int,
                             sparse_levels=("inter_node", "cross_rack")) -> torch.Tensor:
    """Critical embedding gradients: exact, dense inside the node, only the touched rows between nodes.

    Levels outside `sparse_levels` (links the user left uncompressed: fast ones) get a dense all-reduce instead,
    which needs no host sync: the row-sparse exchange must read the row count on the host first."""
    intra = ex.groups.get("intra_node")
    split = intra is not None and intra.size > 1
    piece = ex.reduce_scatter(x, intra, Plain("none"), "emb") if split else x
    for lv in ("inter_node", "cross_rack"):
        lg = ex.groups.get(lv)
        if lg is not None and lg.size > 1:
            if lv in sparse_levels:
                piece = ex.sparse_rows_all_reduce(piece, lg, codec, cols)
            else:
                piece = ex.all_reduce(piece, lg, codec, "emb")
    return ex.all_gather(piece, intra, Plain("none"), "emb") if split else piece

