"""Bucketed gradient reduction that starts while backward is still running.

Each parameter's gradient is a view into a flat bucket; its post-accumulate hook counts it in, and when a
bucket is complete it is handed to one communication thread, which reduces buckets strictly in bucket
order (every rank issues the same collectives in the same order, whatever order the hooks fired in).
After backward the trainer calls `finish()`, which waits only for what is still in flight: the time
spent there is the exposed part of communication, and the rest was hidden behind backward.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .codecs import CHUNK, Codec, Plain
from .collectives import LevelExchanger, hierarchical_all_reduce, sparse_rows_hierarchical
from .critical import CriticalPolicy, classify
from .graphed import GraphedExchange, graphable_levels


@dataclass
class Bucket:
    index: int
    kind: str  # "compressed" | "critical" | "embedding"
    params: list[nn.Parameter]
    offsets: list[int]
    numel: int
    flat: torch.Tensor
    cols: int = 0
    last_position: int = 0
    pending: int = 0
    arrived: set[int] = field(default_factory=set)
    ready: threading.Event = field(default_factory=threading.Event)
    event: object = None


class HcofReducer:
    def __init__(self, model: nn.Module, exchanger: LevelExchanger, codecs: dict[str, Codec],
                 policy: CriticalPolicy, world_size: int, device: torch.device,
                 bucket_mb: float = 25.0, first_bucket_mb: float = 1.0, codec_graphs: bool = True) -> None:
        self.ex = exchanger
        self.codecs = codecs
        self.world_size = world_size
        self.device = device
        self.critical_codecs = {lv: codecs.get("critical", Plain("none")) for lv in exchanger.groups}
        # Embedding rows go sparse only across links the user compresses (slow ones): on a link left at `none`
        # the dense all-reduce is cheap and needs no host sync.
        self.sparse_levels = tuple(lv for lv in ("inter_node", "cross_rack")
                                   if codecs.get(lv, Plain("none")).name != "none")
        self.buckets = self._make_buckets(model, classify(model, policy), bucket_mb, first_bucket_mb)
        self.where = {id(p): (b, i) for b in self.buckets for i, p in enumerate(b.params)}
        self._lock = threading.Lock()
        self._jobs: queue.Queue = queue.Queue()
        self._done = threading.Event()
        self._error: BaseException | None = None
        self.step_busy = 0.0
        self.comm_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        # Gradients live in the buckets (as DDP's gradient_as_bucket_view): backward accumulates straight into
        # the flat buffers, so there is nothing to copy in before the exchange or out after it.
        self._views: dict[int, torch.Tensor] = {}
        with torch.no_grad():
            for b in self.buckets:
                for i, p in enumerate(b.params):
                    view = b.flat[b.offsets[i]: b.offsets[i] + p.numel()].view_as(p)
                    if p.grad is not None:
                        view.copy_(p.grad)
                    p.grad = view
                    self._views[id(p)] = view
        for p in model.parameters():
            if id(p) in self.where:
                p.register_post_accumulate_grad_hook(self._on_grad)
        # Compressed buckets replay their codec work from CUDA graphs once one eager step has run (it creates the
        # residuals and every lazily initialised library handle); see graphed.py.
        self._graph_levels = graphable_levels(exchanger, codecs) if codec_graphs else None
        self._graphed: dict[int, GraphedExchange] = {}
        self._graph_pool = None  # one memory pool for all the buckets' graphs, made with the first
        self._steps_started = 0
        self._thread = threading.Thread(target=self._run, name="hcof-comm", daemon=True)
        self._thread.start()

    # -- layout --------------------------------------------------------------------------------------
    def _make_buckets(self, model, kinds, bucket_mb, first_bucket_mb) -> list[Bucket]:
        params = [p for p in dict.fromkeys(model.parameters()) if id(p) in kinds]
        order = list(reversed(params))  # gradients arrive roughly from the last layer to the first
        align = self.world_size * CHUNK
        open_: dict[str, list] = {"compressed": [], "critical": []}
        cap_elems = lambda first: int((first_bucket_mb if first else bucket_mb) * 2**20 / 4)  # noqa: E731
        groups: list[tuple[str, list, int]] = []
        for pos, p in enumerate(order):
            kind = kinds[id(p)]
            if kind == "embedding":
                groups.append((kind, [p], pos))
                continue
            open_[kind].append(p)
            if sum(q.numel() for q in open_[kind]) >= cap_elems(not groups):
                groups.append((kind, open_[kind], pos))
                open_[kind] = []
        for kind, rest in open_.items():
            if rest:
                groups.append((kind, rest, len(order)))
        groups.sort(key=lambda g: g[2])
        buckets = []
        intra = self.ex.groups.get("intra_node")
        intra_size = intra.size if intra else 1
        for i, (kind, ps, last) in enumerate(groups):
            offsets, total = [], 0
            for p in ps:
                offsets.append(total)
                total += p.numel()
            cols = 0
            if kind == "embedding":
                cols = ps[0].shape[1]
                rows = -(-ps[0].shape[0] // intra_size) * intra_size
                padded = rows * cols
            else:
                padded = -(-total // align) * align
            flat = torch.zeros(padded, dtype=torch.float32, device=self.device)
            buckets.append(Bucket(index=i, kind=kind, params=ps, offsets=offsets, numel=total, flat=flat,
                                  cols=cols, last_position=last))
        return buckets

    def describe(self) -> list[dict]:
        return [{"kind": b.kind, "tensors": len(b.params), "elements": b.numel} for b in self.buckets]

    # -- backward side ---------------------------------------------------------------------------------
    def start_step(self) -> None:
        if self._error is not None:
            raise RuntimeError("gradient communication failed") from self._error
        for b in self.buckets:
            b.pending = len(b.params)
            b.arrived = set()
            b.ready.clear()
        self._steps_started += 1
        self._done.clear()
        self._jobs.put("step")

    def _on_grad(self, p: torch.Tensor) -> None:
        b, i = self.where[id(p)]
        view = self._views[id(p)]
        if p.grad.data_ptr() != view.data_ptr():
            # Something replaced the gradient tensor (set_to_none, a user's hook): copy, then re-attach the view.
            view.copy_(p.grad)
            p.grad = view
        with self._lock:
            if i in b.arrived:
                return
            b.arrived.add(i)
            b.pending -= 1
            complete = b.pending == 0
        if complete:
            self._mark_ready(b)

    def _mark_ready(self, b: Bucket) -> None:
        if self.device.type == "cuda":
            b.event = torch.cuda.Event()
            b.event.record(torch.cuda.current_stream(self.device))
        b.ready.set()

    def finish(self) -> float | None:
        """Hand the averaged gradients back to the optimizer once the step's reductions are done.

        On CPU the collectives are synchronous: this waits for them and returns the exposed seconds (the part
        of communication not hidden behind backward). On a GPU nothing waits on the host: the compute stream is
        made to wait for the communication stream, and `timings()` reads the exposed and busy seconds from
        CUDA events once the caller has synchronized anyway (a host sync here would drain the launch queue
        and leave the GPU idle while the optimizer and the next forward are queued)."""
        cuda = self.device.type == "cuda"
        if cuda:
            self._bwd_end = torch.cuda.Event(enable_timing=True)
            self._bwd_end.record(torch.cuda.current_stream(self.device))
        start = time.perf_counter()
        for b in self.buckets:
            if not b.ready.is_set():
                # Parameters without a gradient this step (unused branches) contribute zeros.
                for i, p in enumerate(b.params):
                    if i not in b.arrived:
                        b.flat[b.offsets[i]: b.offsets[i] + p.numel()].zero_()
                self._mark_ready(b)
        self._done.wait()  # on a GPU: everything is queued on the communication stream
        if self._error is not None:
            raise RuntimeError("gradient communication failed") from self._error
        for b in self.buckets:
            for p in b.params:
                if p.grad is None or p.grad.data_ptr() != self._views[id(p)].data_ptr():
                    p.grad = self._views[id(p)]
        if cuda:
            torch.cuda.current_stream(self.device).wait_stream(self.comm_stream)
            return None
        return time.perf_counter() - start

    def timings(self) -> tuple[float, float]:
        """(exposed, busy) seconds of the last step on a GPU; call after the device was synchronized."""
        exposed = max(0.0, self._bwd_end.elapsed_time(self._comm_end) / 1000.0)
        self.step_busy = self.ex.resolve_times()
        return exposed, self.step_busy

    def zero_grad(self) -> None:
        """Zero every gradient with one fill per bucket (they are views into the buckets)."""
        for b in self.buckets:
            b.flat.zero_()

    # -- communication thread ------------------------------------------------------------------------
    def _run(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        while True:
            self._jobs.get()
            busy = 0.0
            try:
                for b in self.buckets:
                    b.ready.wait()
                    t0 = time.perf_counter()
                    if self.comm_stream is not None:
                        # The GPU, not the host, waits for the bucket's last gradient: the exchange is queued
                        # behind it on the communication stream while backward goes on on its own stream.
                        self.comm_stream.wait_event(b.event)
                        with torch.cuda.stream(self.comm_stream):
                            self._reduce(b)
                    else:
                        self._reduce(b)
                    busy += time.perf_counter() - t0
            except BaseException as exc:  # noqa: BLE001 - handed to the training thread, which raises it
                self._error = exc
            if self.comm_stream is None:
                self.step_busy = busy  # on CPU the collectives are synchronous: host time is their time
            else:
                self._comm_end = torch.cuda.Event(enable_timing=True)
                self._comm_end.record(self.comm_stream)
            self._done.set()

    def _reduce(self, b: Bucket) -> None:
        key = f"b{b.index}"
        b.flat.div_(self.world_size)  # every level sums; the optimizer wants the mean
        if b.kind == "compressed" and self._graph_levels and self._steps_started > 1:
            intra, outer = self._graph_levels
            self.run_graphed(b, outer, intra)
            return
        if b.kind == "embedding":
            out = sparse_rows_hierarchical(self.ex, b.flat, self.critical_codecs["intra_node"], b.cols,
                                           self.sparse_levels)
        elif b.kind == "critical":
            out = hierarchical_all_reduce(self.ex, b.flat, self.critical_codecs, key)
        else:
            out = hierarchical_all_reduce(self.ex, b.flat, self.codecs, key)
        if out is not b.flat:
            b.flat.copy_(out)

    def run_graphed(self, b: Bucket, outer, intra) -> None:  # noqa: ANN001
        """The bucket's compressed exchange at `outer` (inside `intra`, if any) from its CUDA graphs, captured
        on first use (graphed.py)."""
        graphed = self._graphed.get(b.index)
        if graphed is None:
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            graphed = self._graphed[b.index] = GraphedExchange(
                self.ex, b.flat, self.codecs[outer.level], outer, intra, f"b{b.index}", self._graph_pool)
        graphed.run()

    # -- checkpoints ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"residuals": self.ex.ef.state_dict(),
                "powersgd_q": {k: v.cpu() for k, v in self.ex._powersgd_q.items()}}

    def load_state_dict(self, state: dict) -> None:
        self._graphed.clear()  # captured graphs hold the old residual tensors: capture again
        self.ex.ef.load_state_dict(state.get("residuals", {}), self.device)
        self.ex._powersgd_q = {k: v.to(self.device) for k, v in state.get("powersgd_q", {}).items()}
