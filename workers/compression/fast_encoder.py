"""A BERT-family encoder executed with FP8 Linear layers whose input scales are calibrated once.

`Encoder` runs a catalog BERT (`minilm-l6`, `bert-base`: a BertModel inside `HiddenStates` or
`SentenceEmbedder`) as HF's BertModel does, with the same weights and outputs, but each layer's
query, key and value projections are one GEMM (three separate ones cost a BERT-base forward 0.1 ms
at batch 1 on an H200; `bench/static_fp8_encoder.py`).

`fp8_static_encoder` turns it into the fast FP8 form:

- every Linear becomes `StaticFp8Linear`: the weight in e4m3 with **one scale per tensor**, the input
  quantized to e4m3 with a scale fixed on calibration inputs (the largest absolute input seen there,
  over 448). Quantizing an input is then a multiply, a clamp and a cast, which the compiler fuses
  into the kernel that produces it (LayerNorm, GELU), and the GEMM is cuBLASLt's native tensor-wise
  FP8 GEMM with the bias in its epilogue. The dynamic per-token scales of `fp8_linear.Fp8Linear`
  cost a reduction and a second pass over every input, which made FP8 encoders 1.2-1.5x slower than
  bf16 (session 6); these do not.
- the word-embedding table is packed to int4 (`int4_g64` by default) and a lookup dequantizes only
  the rows it gathers, so the whole model is >= 4x smaller than fp32.

Inputs larger than the calibration maximum are clipped to +-448 x scale (`margin` > 1 leaves room).
On CPU the same tensor-wise FP8 product is an fp32 GEMM of the e4m3 operands (exact in fp32) times
the two scales, so tests here check the numbers a GPU computes, up to accumulation order.
(`torch._scaled_mm` on CPU gives the same numbers but took 2.4 s for one 128 x 384 x 1152 product
on a Xeon with AMX, torch 2.13.)

`executed_encoder` is how the compression runner executes a BERT with `--fp8-inputs static`: from
the packed weights (unpacked), the Linears assigned `fp8_e4m3` re-quantized to one scale per tensor,
with input scales that the artifact's manifest stores, so that serving it reproduces the run.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from .fp8_linear import FP8, FP8_MAX
from .quantize import pack, parse_format, unpack

EPS = 1e-12
WORD_EMBEDDINGS = "embeddings.word_embeddings"


class StaticFp8Linear(nn.Module):
    """y = x W^T + b: W in e4m3 with one scale, x cast to e4m3 with a fixed scale, bf16 out."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, input_scale: float):
        super().__init__()
        if not input_scale > 0 or not math.isfinite(input_scale):
            raise ValueError(f"input scale must be a positive number, got {input_scale!r}")
        w = weight.detach().float()
        self.out_features, self.in_features = w.shape
        scale = w.abs().amax().clamp(min=EPS) / FP8_MAX
        self.register_buffer("qweight", (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).contiguous())
        self.register_buffer("weight_scale", scale.reshape(()).float())
        self.register_buffer("input_scale", torch.tensor(float(input_scale), dtype=torch.float32, device=w.device))
        self.inv_input_scale = 1.0 / float(input_scale)  # a Python float: a constant in the compiled kernel
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16).contiguous())

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() * self.inv_input_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        xq = self.quantize_input(x.reshape(-1, self.in_features))
        if xq.device.type == "cuda":
            y = torch._scaled_mm(xq, self.qweight.t(), scale_a=self.input_scale, scale_b=self.weight_scale,
                                 bias=self.bias, out_dtype=torch.bfloat16, use_fast_accum=True)
        else:
            # The same product of the e4m3 operands (exact in fp32) and the two scales. torch's CPU
            # _scaled_mm computes it too, but on some CPUs takes seconds for one small GEMM.
            y = (xq.float() @ self.qweight.float().t()) * (self.input_scale * self.weight_scale)
            if self.bias is not None:
                y = y + self.bias.float()
            y = y.to(torch.bfloat16)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"e4m3 weight (one scale), e4m3 input (static scale {float(self.input_scale):.4g})")


class PackedEmbedding(nn.Module):
    """An Embedding whose table is packed to int4 (quantize.pack's layout); a lookup dequantizes only
    the rows it gathers, in fp32, then casts to `dtype`."""

    def __init__(self, layer: nn.Embedding, fmt: str = "int4_g64", dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        kind, group = parse_format(fmt)
        if kind != "int4":
            raise ValueError(f"PackedEmbedding packs int4 tables only, not {fmt!r}")
        rows, cols = layer.weight.shape
        self.fmt, self.dtype, self.cols = fmt, dtype, cols
        self.group = min(group, cols)
        self.padded = math.ceil(cols / self.group) * self.group
        if self.padded % 2:
            raise ValueError("an int4 row must hold an even number of codes")
        packed = pack(layer.weight, fmt)
        self.register_buffer("q", packed["q"].reshape(rows, self.padded // 2).contiguous())
        self.register_buffer("scale", packed["scale"].reshape(rows, -1).contiguous())
        self.register_buffer("zero", packed["zero"].reshape(rows, -1).contiguous())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        # Each row's codes fill whole bytes (padded is even), so the gathered rows are a pack of their own.
        gathered = {"q": self.q[flat].reshape(-1), "scale": self.scale[flat], "zero": self.zero[flat]}
        rows = unpack(gathered, self.fmt, (flat.numel(), self.cols))
        return rows.to(self.dtype).reshape(*ids.shape, self.cols)

    def extra_repr(self) -> str:
        return f"{self.q.shape[0]}, {self.cols}, {self.fmt} (rows dequantized at lookup)"


class Layer(nn.Module):
    """One BERT layer (post-LayerNorm, GELU) with Q, K and V in one projection."""

    def __init__(self, hf_layer: nn.Module):
        super().__init__()
        att = hf_layer.attention.self
        q, k, v = att.query, att.key, att.value
        qkv = nn.Linear(q.in_features, 3 * q.out_features, device=q.weight.device, dtype=q.weight.dtype)
        with torch.no_grad():
            qkv.weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
            qkv.bias.copy_(torch.cat([q.bias, k.bias, v.bias]))
        # From the layer itself, not the config: head pruning leaves fewer heads of the same size.
        self.head_size = att.attention_head_size
        self.heads = q.out_features // self.head_size
        self.qkv, self.o = qkv, copy.deepcopy(hf_layer.attention.output.dense)
        self.ln1 = copy.deepcopy(hf_layer.attention.output.LayerNorm)
        self.fc1, self.fc2 = copy.deepcopy(hf_layer.intermediate.dense), copy.deepcopy(hf_layer.output.dense)
        self.ln2 = copy.deepcopy(hf_layer.output.LayerNorm)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, _ = h.shape
        q, k, v = self.qkv(h).view(b, t, 3, self.heads, self.head_size).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
        a = a.reshape(b, t, self.heads * self.head_size)
        h = self.ln1(self.o(a).to(h.dtype) + h)
        return self.ln2(self.fc2(F.gelu(self.fc1(h))).to(h.dtype) + h)


class Encoder(nn.Module):
    """A catalog BERT task model (HiddenStates: last hidden states; SentenceEmbedder: mean-pooled,
    normalised) with `Layer`s; same inputs (input_ids, attention_mask) and outputs."""

    def __init__(self, task_model: nn.Module):
        super().__init__()
        bert = getattr(task_model, "bert", None)
        if bert is None or not hasattr(bert, "encoder"):
            raise ValueError("Encoder takes a BERT task model (minilm-l6, bert-base)")
        config = bert.config
        if getattr(config, "hidden_act", "gelu") != "gelu" or getattr(config, "is_decoder", False):
            raise ValueError("Encoder runs post-LayerNorm BERT encoders with exact GELU only")
        self.pool = type(task_model).__name__ == "SentenceEmbedder"
        self.embeddings = copy.deepcopy(bert.embeddings)
        self.layers = nn.ModuleList(Layer(layer) for layer in bert.encoder.layer)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.embeddings(input_ids=input_ids)
        keep = attention_mask[:, None, None, :].bool()
        mask = torch.zeros(keep.shape, dtype=h.dtype, device=h.device).masked_fill(~keep, torch.finfo(h.dtype).min)
        for layer in self.layers:
            h = layer(h, mask)
        if not self.pool:
            return h
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return F.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


@torch.inference_mode()
def input_amax(model: nn.Module, batches: list[tuple], names: list[str] | None = None) -> dict[str, float]:
    """The largest absolute input of each named Linear (default: all) over `batches`."""
    modules = dict(model.named_modules())
    amax: dict[str, float] = {}
    hooks = []
    for name in names if names is not None else linear_names(model):
        def hook(_mod, args, name=name):
            amax[name] = max(amax.get(name, 0.0), args[0].detach().abs().amax().item())
        hooks.append(modules[name].register_forward_pre_hook(hook))
    try:
        for b in batches:
            model(*b)
    finally:
        for h in hooks:
            h.remove()
    return amax


def fp8_static_encoder(task_model: nn.Module, calib_batches: list[tuple] | None, margin: float = 1.0,
                       fp8_layers: list[str] | None = None, word_format: str | None = "int4_g64",
                       input_scales: dict[str, float] | None = None) -> Encoder:
    """The task model as an `Encoder` in bf16 with the named Linears (default: all) as StaticFp8Linear
    and the word embeddings packed to `word_format` (None: bf16). The input scales are `input_scales`
    ({encoder Linear name: scale}, e.g. an artifact's) or else calibrated on `calib_batches` (on the
    model's device): the largest absolute input times `margin`, over 448."""
    if not margin > 0:
        raise ValueError(f"margin must be positive, got {margin!r}")
    if input_scales is None and not calib_batches:
        raise ValueError("static input scales need at least one calibration batch")
    reference = Encoder(task_model).float().eval()
    names = linear_names(reference) if fp8_layers is None else list(fp8_layers)
    unknown = sorted(set(names) - set(linear_names(reference)))
    if unknown:
        raise ValueError(f"not Linear layers of the encoder: {', '.join(unknown)}")
    if input_scales is None:
        amax = input_amax(reference, calib_batches, names)
        input_scales = {n: max(amax[n] * margin, EPS) / FP8_MAX for n in names}
    missing = sorted(set(names) - set(input_scales))
    if missing:
        raise ValueError(f"no input scale for {', '.join(missing)}")
    model = copy.deepcopy(reference).to(torch.bfloat16)
    modules, fp32 = dict(model.named_modules()), dict(reference.named_modules())
    for name in names:
        parent, _, child = name.rpartition(".")
        src = fp32[name]
        setattr(modules[parent], child, StaticFp8Linear(src.weight, src.bias, float(input_scales[name])))
    if word_format is not None:
        parent, _, child = WORD_EMBEDDINGS.rpartition(".")
        setattr(modules[parent], child, PackedEmbedding(fp32[WORD_EMBEDDINGS], word_format))
    return model.eval()


# Where each HF BertLayer Linear goes in a `Layer` (Q, K and V share one).
LAYER_LINEARS = {"attention.self.query": "qkv", "attention.self.key": "qkv", "attention.self.value": "qkv",
                 "attention.output.dense": "o", "intermediate.dense": "fc1", "output.dense": "fc2"}


def encoder_sources(task_model: nn.Module) -> dict[str, list[str]]:
    """{Encoder Linear or word table name: the task model's layer names it is made of}."""
    out: dict[str, list[str]] = {WORD_EMBEDDINGS: [f"bert.{WORD_EMBEDDINGS}"]}
    for i, _ in enumerate(task_model.bert.encoder.layer):
        for hf, ours in LAYER_LINEARS.items():
            out.setdefault(f"layers.{i}.{ours}", []).append(f"bert.encoder.layer.{i}.{hf}")
    return out


def stored_formats(task_model: nn.Module, groups: list[str], word_format: str | None = "int4_g64") -> dict[str, str]:
    """The task model's layer formats when the Encoder Linears `groups` run FP8: their source layers
    fp8_e4m3, every other Linear bf16 (as it runs), the word table `word_format` (for report.weight_bytes)."""
    sources = encoder_sources(task_model)
    fp8 = {hf for g in groups for hf in sources[g]}
    linears = [n for n, m in task_model.named_modules() if isinstance(m, nn.Linear)]
    formats = {n: "fp8_e4m3" if n in fp8 else "bf16" for n in linears}
    if word_format is not None:
        formats[sources[WORD_EMBEDDINGS][0]] = word_format
    return formats


def fp8_groups(model: nn.Module, assignment: dict[str, str]) -> list[str]:
    """The Encoder Linears whose source layers are all assigned `fp8_e4m3` (Q, K and V: all three)."""
    return [ours for ours, hf in encoder_sources(model).items()
            if ours != WORD_EMBEDDINGS and all(assignment.get(n) == "fp8_e4m3" for n in hf)]


def executed_encoder(model: nn.Module, assignment: dict[str, str], calib_batches: list[tuple] | None,
                     margin: float = 1.0, input_scales: dict[str, float] | None = None,
                     only: list[str] | None = None) -> tuple[Encoder, dict]:
    """How a compression run executes a BERT whose weights are `model`'s (the packed weights, unpacked)
    with `--fp8-inputs static`: every Encoder Linear whose source layers are all assigned `fp8_e4m3`
    (of those, only the ones in `only`, if given) becomes a StaticFp8Linear (one weight scale, a static
    input scale), an int4 word table a PackedEmbedding; every other assigned layer runs its unpacked
    weights in bf16 (simulated).

    Returns the model and what to report and store: {"mode", "margin", "input_scales" (by Encoder
    Linear: the layers that run FP8), "simulated_layers" (the task model's names)}."""
    sources = encoder_sources(model)
    fp8 = fp8_groups(model, assignment)
    if only is not None:
        fp8 = [n for n in fp8 if n in set(only)]
    word_fmt = assignment.get(sources[WORD_EMBEDDINGS][0])
    word_format = word_fmt if word_fmt is not None and word_fmt.startswith("int4") else None
    on_kernels = {n for ours in fp8 for n in sources[ours]}
    if word_format is not None:
        on_kernels.add(sources[WORD_EMBEDDINGS][0])
    if not fp8:
        raise ValueError("--fp8-inputs static: no Linear layer (with its Q/K/V siblings) is assigned fp8_e4m3")
    executed = fp8_static_encoder(model, calib_batches, margin, fp8_layers=fp8, word_format=word_format,
                                  input_scales=input_scales)
    modules = dict(executed.named_modules())
    scales = {n: float(modules[n].input_scale) for n in fp8}
    info = {
        "mode": "static",
        "margin": margin,
        "input_scales": scales,
        "simulated_layers": sorted(n for n in assignment if n not in on_kernels),
    }
    return executed, info


@torch.inference_mode()
def captured(fn, inputs: tuple) -> torch.cuda.CUDAGraph:
    """One call of `fn(*inputs)` captured as a CUDA graph, after three warm-up calls (compilation)."""
    for _ in range(3):
        fn(*inputs)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(*inputs)
    return graph


@torch.inference_mode()
def graph_latencies_ms(models: dict[str, nn.Module], inputs: tuple, rounds: int = 50) -> dict[str, float]:
    """Median time of one forward of each model on CUDA, each compiled (inductor, default mode) and
    captured as one CUDA graph: the encoder as it would be deployed. The graphs are replayed in turn,
    round after round, so that clock drift between measurements hits every model alike (measured one
    after another, the same bf16 model's time moved by 5 % between processes)."""
    import statistics

    graphs = {label: captured(torch.compile(model, dynamic=False), inputs) for label, model in models.items()}
    for graph in graphs.values():
        for _ in range(5):
            graph.replay()
    times: dict[str, list[float]] = {label: [] for label in graphs}
    for _ in range(rounds):
        for label, graph in graphs.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times[label].append(start.elapsed_time(end))
    return {label: statistics.median(t) for label, t in times.items()}


def batches_of(example: tuple, sizes: tuple[int, ...] = (1, 8, 64)) -> dict[str, tuple]:
    """The example (input_ids, attention_mask) repeated or cut to each batch size."""
    ids, mask = example
    out = {}
    for b in sizes:
        reps = -(-b // ids.shape[0])
        out[f"b{b}x{ids.shape[1]}"] = (ids.repeat(reps, 1)[:b], mask.repeat(reps, 1)[:b])
    return out


def choose_fp8_groups(model: nn.Module, assignment: dict[str, str], input_scales: dict[str, float],
                      example: tuple) -> tuple[list[str], dict]:
    """On a CUDA GPU: which of the fp8-assigned Linears to run in FP8, by measured latency. Times the
    bf16 Encoder and two candidates (every fp8 group; only the MLP's) at batch 1, 8 and 64, each
    compiled and captured as a CUDA graph, replayed in turn (graph_latencies_ms), and keeps the
    candidate with the lowest geometric mean of its times over bf16's. `input_scales` are every fp8
    group's (executed_encoder's, calibrated once). Returns the chosen groups and the timings."""
    eligible = fp8_groups(model, assignment)
    candidates = {"every fp8 Linear": eligible,
                  "MLP Linears only": [n for n in eligible if n.endswith((".fc1", ".fc2"))]}
    candidates = {k: v for k, v in candidates.items() if v}
    if len(candidates) == 2 and candidates["MLP Linears only"] == eligible:
        candidates.pop("MLP Linears only")
    device = next(model.parameters()).device
    inputs = {k: tuple(t.to(device) for t in v) for k, v in batches_of(example).items()}
    variants = {"bf16 (fused QKV)": Encoder(model).to(torch.bfloat16).eval()}
    for label, groups in candidates.items():
        variants[label], _ = executed_encoder(model, assignment, None, input_scales=input_scales, only=groups)
    timings: dict[str, dict[str, float]] = {label: {} for label in variants}
    for key, x in inputs.items():
        for label, ms in graph_latencies_ms(variants, x).items():
            timings[label][key] = round(ms, 4)
        torch._dynamo.reset()
    base = timings["bf16 (fused QKV)"]

    def score(label: str) -> float:
        return math.exp(sum(math.log(timings[label][k] / base[k]) for k in base) / len(base))

    best = min(candidates, key=score)
    return candidates[best], {"chosen": best, "latency_ms": timings,
                              "ratio_to_bf16": {k: {b: round(v[b] / base[b], 3) for b in base}
                                                for k, v in timings.items()}}
