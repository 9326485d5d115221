"""Weight formats: fake quantization for measuring quality, real packing for size and artifacts.

Every format here is weight-only: activations stay in the model's compute dtype. The packed form is
what the artifact stores, so the bytes reported are bytes on disk, not a bits-per-weight estimate:
int4 stores two nibbles per byte plus an fp16 scale and fp16 minimum per group; int8 and fp8 store
one byte per weight plus one fp32 scale per output row; bf16 stores two bytes per weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

FP8_MAX = 448.0  # largest finite float8_e4m3fn value
FULL = "fp32"


@dataclass(frozen=True)
class Format:
    name: str
    bits: int  # payload bits per weight, before scales

    def __str__(self) -> str:
        return self.name


def parse_format(name: str) -> tuple[str, int | None]:
    """'int4_g64' -> ('int4', 64); others -> (name, None)."""
    if name.startswith("int4_g"):
        return "int4", int(name[len("int4_g") :])
    if name in {FULL, "bf16", "fp8_e4m3", "int8"}:
        return name, None
    raise ValueError(f"unknown weight format {name!r}")


def candidate_formats(group_size: int) -> list[str]:
    return ["bf16", "fp8_e4m3", "int8", f"int4_g{group_size}"]


def format_bits(name: str) -> int:
    kind, _ = parse_format(name)
    return {"fp32": 32, "bf16": 16, "fp8_e4m3": 8, "int8": 8, "int4": 4}[kind]


def _rows(w: torch.Tensor) -> torch.Tensor:
    """Weights as (output rows, inputs): Conv2d's (out, in, kh, kw) and Embedding's (vocab, dim) alike."""
    return w.detach().reshape(w.shape[0], -1).float()


def _effective_group(cols: int, group: int) -> int:
    return min(group, cols)


def pack(w: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    """Packed tensors for one weight; keys are suffixes ('q', 'scale', 'zero') or '' for a plain cast."""
    kind, group = parse_format(fmt)
    if kind == FULL:
        return {"": w.detach().float().contiguous()}
    if kind == "bf16":
        return {"": w.detach().to(torch.bfloat16).contiguous()}
    rows = _rows(w)
    if kind == "int8":
        scale = rows.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        q = torch.clamp(torch.round(rows / scale[:, None]), -127, 127).to(torch.int8)
        return {"q": q.contiguous(), "scale": scale.contiguous()}
    if kind == "fp8_e4m3":
        scale = rows.abs().amax(dim=1).clamp(min=1e-12) / FP8_MAX
        q = (rows / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return {"q": q.view(torch.uint8).contiguous(), "scale": scale.contiguous()}
    # int4, asymmetric per group of `group` inputs along each row; the last group is zero-padded.
    cols = rows.shape[1]
    g = _effective_group(cols, group)
    padded = math.ceil(cols / g) * g
    if padded != cols:
        rows = torch.nn.functional.pad(rows, (0, padded - cols))
    grouped = rows.reshape(rows.shape[0], padded // g, g)
    lo = grouped.amin(dim=2)
    hi = grouped.amax(dim=2)
    # fp16 parameters are what gets stored, so quantize against the rounded ones.
    scale = ((hi - lo) / 15.0).clamp(min=1e-8).to(torch.float16)
    zero = lo.to(torch.float16)
    q = torch.clamp(torch.round((grouped - zero.float()[..., None]) / scale.float()[..., None]), 0, 15).to(torch.uint8)
    flat = q.reshape(-1)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    nibbles = (flat[0::2] | (flat[1::2] << 4)).contiguous()
    return {"q": nibbles, "scale": scale.contiguous(), "zero": zero.contiguous()}


def pack_fp8_one_scale(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """pack(w, 'fp8_e4m3') with every row's scale set to the whole tensor's (amax / 448): the same
    stored layout, so unpack and the row-wise kernels read it unchanged."""
    rows = _rows(w)
    scale = rows.abs().amax().clamp(min=1e-12) / FP8_MAX
    q = (rows / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return {"q": q.view(torch.uint8).contiguous(), "scale": scale.expand(rows.shape[0]).contiguous()}


def unpack(packed: dict[str, torch.Tensor], fmt: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The fp32 weight that a packed tensor stands for (what simulated execution computes with)."""
    kind, group = parse_format(fmt)
    if kind in (FULL, "bf16"):
        return packed[""].float().reshape(shape)
    out_rows = shape[0]
    cols = math.prod(shape[1:])
    if kind == "int8":
        return (packed["q"].float() * packed["scale"][:, None]).reshape(shape)
    if kind == "fp8_e4m3":
        q = packed["q"].view(torch.float8_e4m3fn).float()
        return (q * packed["scale"][:, None]).reshape(shape)
    g = _effective_group(cols, group)
    n_groups = math.ceil(cols / g)
    nibbles = packed["q"]
    flat = torch.stack([nibbles & 0x0F, nibbles >> 4], dim=1).reshape(-1)[: out_rows * n_groups * g]
    grouped = flat.reshape(out_rows, n_groups, g).float()
    deq = grouped * packed["scale"].float()[..., None] + packed["zero"].float()[..., None]
    return deq.reshape(out_rows, n_groups * g)[:, :cols].reshape(shape)


def fake_quant(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """Quantize then dequantize, in the weight's dtype and device."""
    return unpack(pack(w, fmt), fmt, tuple(w.shape)).to(dtype=w.dtype, device=w.device)


class Rounding:
    """How weights are rounded into their packed format: to nearest (RTN), or, for int4 Linear weights
    whose layer has a Hessian, by GPTQ (gptq.py). GPTQ results are cached per (layer, format): one
    Rounding serves one model state (the pruned model a run quantizes)."""

    def __init__(self, hessians: dict[str, torch.Tensor] | None = None, fp8_one_scale: bool = False):
        self.hessians = hessians or {}
        # fp8_e4m3 weights with one scale shared by all rows (stored per row as usual): what a tensor-wise
        # FP8 GEMM computes with, so that fast_encoder's StaticFp8Linear runs these codes unchanged.
        self.fp8_one_scale = fp8_one_scale
        self._cache: dict[tuple[str, str], dict[str, torch.Tensor]] = {}

    @property
    def name(self) -> str:
        return "gptq" if self.hessians else "rtn"

    def pack(self, layer: str, w: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
        kind, group = parse_format(fmt)
        if kind == "fp8_e4m3" and self.fp8_one_scale:
            return pack_fp8_one_scale(w)
        hessian = self.hessians.get(layer)
        if kind != "int4" or hessian is None or w.dim() != 2 or w.shape[1] % group:
            return pack(w, fmt)
        key = (layer, fmt)
        if key not in self._cache:
            from .gptq import gptq_int4

            self._cache[key] = gptq_int4(w, hessian, group)
        return self._cache[key]

    def fake_quant(self, layer: str, w: torch.Tensor, fmt: str) -> torch.Tensor:
        return unpack(self.pack(layer, w, fmt), fmt, tuple(w.shape)).to(dtype=w.dtype, device=w.device)


RTN = Rounding()


def packed_bytes(packed: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in packed.values())


def estimate_bytes(shape: tuple[int, ...], fmt: str) -> int:
    """Bytes pack() would produce for a weight of this shape, without packing it."""
    kind, group = parse_format(fmt)
    n = math.prod(shape)
    rows, cols = shape[0], n // shape[0]
    if kind == FULL:
        return 4 * n
    if kind == "bf16":
        return 2 * n
    if kind in ("int8", "fp8_e4m3"):
        return n + 4 * rows
    g = _effective_group(cols, group)
    n_groups = math.ceil(cols / g)
    return math.ceil(rows * n_groups * g / 2) + 4 * rows * n_groups


QUANTIZABLE = (nn.Linear, nn.Conv2d, nn.Embedding)


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Layers whose weight may change format; norms and biases always stay in full precision."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QUANTIZABLE) and m.weight.dim() >= 2}


def apply_simulated(model: nn.Module, assignment: dict[str, str], rounding: Rounding = RTN) -> nn.Module:
    """Replace each assigned layer's weight in place by its quantize-dequantize image."""
    layers = dict(model.named_modules())
    with torch.no_grad():
        for name, fmt in assignment.items():
            if fmt != FULL:
                w = layers[name].weight
                w.copy_(rounding.fake_quant(name, w, fmt))
    return model


def torchao_config(fmt: str, device: str):
    """The torchao config that executes a format with real kernels on `device`, or None if there is none.

    Facts behind the table (torchao 0.17/0.18): on CPU, Int8WeightOnly and Float8WeightOnly run,
    int4 has no CPU packing (plain needs the mslk library, tile_packed_to_4d needs CUDA). On CUDA
    sm80+, int4 runs with tile_packed_to_4d (tinygemm); fp8 needs sm89+.
    """
    from torchao.quantization import Float8WeightOnlyConfig, Int4WeightOnlyConfig, Int8WeightOnlyConfig

    kind, group = parse_format(fmt)
    if kind == "int8":
        return Int8WeightOnlyConfig()
    if kind == "fp8_e4m3":
        if device == "cuda" and torch.cuda.get_device_capability() < (8, 9):
            return None
        return Float8WeightOnlyConfig()
    if kind == "int4" and device == "cuda":
        return Int4WeightOnlyConfig(group_size=group, int4_packing_format="tile_packed_to_4d")
    return None


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` where the submodule called `name` is."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def has_kernel(layer: nn.Module, fmt: str, device: torch.device | str) -> bool:
    """Whether a Linear layer in this format runs on a real kernel on `device` straight from its packed
    tensors: fp8_e4m3 on FP8 tensor cores (fp8_linear.py), int4 on PyTorch's int4 kernels
    (int4_linear.py), each only in the shapes the kernel takes."""
    from . import fp8_linear, int4_linear

    if not isinstance(layer, nn.Linear):
        return False
    kind, group = parse_format(fmt)
    if kind == "fp8_e4m3":
        return fp8_linear.kernel_available(device) and fp8_linear.kernel_shape(layer.out_features, layer.in_features)
    if kind == "int4":
        return int4_linear.kernel_available(device) and int4_linear.kernel_shape(
            layer.out_features, layer.in_features, group, device)
    return False


def kernel_layer(layer: nn.Linear, fmt: str, packed: dict[str, torch.Tensor], out_dtype: torch.dtype) -> nn.Module:
    """The module that computes `layer` from its packed tensors (on their device) where has_kernel says so."""
    from . import fp8_linear, int4_linear

    kind, group = parse_format(fmt)
    if kind == "fp8_e4m3":
        return fp8_linear.Fp8Linear.from_packed(packed, layer.bias, out_dtype)
    return int4_linear.Int4Linear(packed, layer.in_features, layer.out_features, group, layer.bias, out_dtype)


def apply_torchao(
    model: nn.Module, assignment: dict[str, str], device: str, rounding: Rounding = RTN, use_torchao: bool = True
) -> tuple[nn.Module, list[str]]:
    """Execute the assignment with real kernels where they exist; return the layers left simulated.

    fp8_e4m3 Linear layers on a GPU with FP8 tensor cores (sm89+) become Fp8Linear (fp8_linear.py): the
    packed weight exactly, times inputs rounded to e4m3 per token — W8A8, which is what makes FP8 pay
    (torchao's Float8WeightOnly dequantizes to bf16 first). int4 Linear layers on sm80+ become
    Int4Linear (int4_linear.py): the packed codes at their own grid on tinygemm. The rest goes to
    torchao, as follows (int8; int4 of shapes tinygemm refuses), unless `use_torchao` is False (the
    engine's CPU runs: torchao's CPU int8/fp8 are not faster there), which simulates it instead. On a
    CPU, int4 Linear layers run on PyTorch's CPU int4 kernel (int4_linear.py).

    Embeddings and formats without kernels are fake-quantized instead (their quality is still the
    packed weights' quality, their speed that of the compute dtype). torchao rounds from the weights it
    is given, on a grid of its own: it is given the packed weights' image (GPTQ's, for int4 layers with a
    Hessian), and a layer is left to torchao only if what torchao then computes with (its dequantized
    weight) is that image, within `GRID_TOLERANCE`: torchao chooses each group's scale and zero point
    from the image it is given, and where its grid differed from the packed format's, re-rounding would
    add a second error that the reported quality (the packed weights') does not include. Such layers are
    simulated instead. On the H200 (2026-11-29) torchao's int8, int4 (tile-packed) and fp8 reproduced
    round-to-nearest and GPTQ images of a random 768 x 3072 layer to 0.2-0.8 % (mean |difference| / mean
    |weight|), but torchao's int4 refused 72 of BERT-base's 73 GPTQ layers: hence int4 on tinygemm.
    """
    from torchao.quantization import quantize_

    layers = dict(model.named_modules())
    simulated = []
    for name, fmt in assignment.items():
        if fmt in (FULL, "bf16"):
            continue
        layer = layers[name]
        if has_kernel(layer, fmt, device):
            # The packed tensors as they are (GPTQ's codes where it rounded them), on the kernel.
            with torch.no_grad():
                set_module(model, name, kernel_layer(layer, fmt, rounding.pack(name, layer.weight, fmt),
                                                     layer.weight.dtype))
            continue
        cfg = torchao_config(fmt, device) if use_torchao and isinstance(layer, nn.Linear) else None
        if cfg is not None and parse_format(fmt)[0] == "int4" and layer.weight.dtype != torch.bfloat16:
            cfg = None  # tinygemm's int4 takes bf16 activations only
        with torch.no_grad():
            image = rounding.fake_quant(name, layer.weight, fmt)
        if cfg is not None:
            original = layer.weight
            with torch.no_grad():
                layer.weight = nn.Parameter(image.clone(), requires_grad=False)
            try:
                quantize_(layer, cfg, filter_fn=lambda m, _fqn, target=layer: m is target)
            except (AssertionError, RuntimeError, NotImplementedError, ImportError):
                layer.weight = original  # no kernel for this shape or dtype here: simulate it, and say so
            else:
                if same_grid(layer.weight, image):
                    continue
                layer.weight = original  # torchao would compute with other weights: simulate instead
        with torch.no_grad():
            layer.weight.copy_(image)
        simulated.append(name)
    return model, simulated


GRID_TOLERANCE = 0.01  # mean |difference| over mean |weight|; bf16 rounding alone is about 0.001


def same_grid(executed: torch.Tensor, image: torch.Tensor) -> bool:
    """Whether a torchao weight computes with the packed weights' image (see apply_torchao): its
    dequantized values, or, for tensors without a dequantize (int4 tile-packed), what a product with
    the identity gives back."""
    with torch.no_grad():
        try:
            got = executed.dequantize().float().reshape(image.shape)
        except (NotImplementedError, RuntimeError, AttributeError):
            eye = torch.eye(image.shape[1], dtype=image.dtype, device=image.device)
            got = torch.nn.functional.linear(eye, executed).float().t().reshape(image.shape)
        want = image.float()
        scale = want.abs().mean().clamp_min(1e-12)
        return bool((got - want).abs().mean() <= GRID_TOLERANCE * scale)
