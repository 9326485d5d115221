"""The compressed checkpoint: `model.safetensors` (packed weights) + `manifest.json` (formats, shapes).

A fresh process rebuilds the catalog architecture, resizes every layer to the shapes in the manifest
(pruning changed them), unpacks the weights and evaluates: `python -m workers.compression.artifact DIR`
prints the quality it measures, which must equal the quality the compression run reported.
Loading reads safetensors and JSON only; nothing is unpickled.

`--device cuda` serves the artifact as it would be deployed: the stored int4 and fp8 Linear weights
go straight into the GPU kernels (int4_linear.Int4Linear on tinygemm, fp8_linear.Fp8Linear on FP8
tensor cores), never unpacked, the rest in bf16. It then prints the quality of that executed model,
which kernels ran which layers, and the bytes the model holds on the GPU.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from . import BadInput
from .quantize import FULL, RTN, Rounding, packed_bytes, unpack

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
REFERENCE = "reference.safetensors"
FORMAT_VERSION = 1


def pack_state(
    model: nn.Module, assignment: dict[str, str], rounding: Rounding = RTN
) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors to store and the manifest entries that say how to read them back."""
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict] = {}
    weights_of = {f"{name}.weight": fmt for name, fmt in assignment.items()}
    seen: dict[int, str] = {}
    for key, value in model.state_dict().items():
        if value.data_ptr() in seen and value.numel() > 0:
            entries[key] = {"format": "alias", "of": seen[value.data_ptr()], "shape": list(value.shape)}
            continue
        seen[value.data_ptr()] = key
        fmt = weights_of.get(key, FULL if value.is_floating_point() else "raw")
        if fmt == "raw":
            tensors[key] = value.detach().cpu().contiguous()
            entries[key] = {
                "format": "raw",
                "shape": list(value.shape),
                "dtype": str(value.dtype).removeprefix("torch."),
            }
            continue
        packed = {k: t.cpu() for k, t in rounding.pack(key.removesuffix(".weight"), value.detach(), fmt).items()}
        for suffix, t in packed.items():
            tensors[f"{key}.{suffix}" if suffix else key] = t
        entries[key] = {"format": fmt, "shape": list(value.shape), "bytes": packed_bytes(packed)}
    return tensors, entries


def layer_shapes(model: nn.Module) -> dict[str, dict]:
    """What resize_to needs to rebuild pruned layers."""
    shapes = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Identity) and name:
            shapes[name] = {"type": "Identity"}  # a residual block pruning removed
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding, nn.BatchNorm2d, nn.LayerNorm)):
            shapes[name] = {"type": type(m).__name__, "weight": list(m.weight.shape)}
        if hasattr(m, "attention_head_size") and hasattr(m, "query"):
            shapes[name] = {"type": "attention", "heads": m.query.out_features // m.attention_head_size}
    return shapes


def resize_to(model: nn.Module, shapes: dict[str, dict]) -> nn.Module:
    """Replace layers of a freshly built architecture by ones of the manifest's (pruned) sizes."""
    modules = dict(model.named_modules())
    for name, spec in shapes.items():
        m = modules.get(name)
        if m is None:
            raise BadInput(f"the artifact has a layer {name!r} that the architecture does not")
        w = spec.get("weight")
        if spec["type"] == "Identity":
            parent_name, _, leaf = name.rpartition(".")
            setattr(modules[parent_name] if parent_name else model, leaf, nn.Identity())
            continue
        if spec["type"] == "attention":
            m.num_attention_heads = spec["heads"]
            m.all_head_size = spec["heads"] * m.attention_head_size
            continue
        if list(m.weight.shape) == w:
            continue
        if isinstance(m, nn.Linear):
            new = nn.Linear(w[1], w[0], bias=m.bias is not None)
        elif isinstance(m, nn.Conv2d):
            new = nn.Conv2d(
                w[1] * m.groups, w[0], m.kernel_size, m.stride, m.padding, m.dilation, m.groups, bias=m.bias is not None
            )
        elif isinstance(m, nn.Embedding):
            new = nn.Embedding(w[0], w[1], padding_idx=m.padding_idx)
        elif isinstance(m, nn.BatchNorm2d):
            new = nn.BatchNorm2d(w[0], eps=m.eps, momentum=m.momentum)
        elif isinstance(m, nn.LayerNorm):
            new = nn.LayerNorm(w, eps=m.eps)
        else:
            raise BadInput(f"cannot resize layer {name!r} of type {type(m).__name__}")
        parent_name, _, leaf = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, leaf, new)
    return model


def save(
    out_dir: Path,
    model: nn.Module,
    assignment: dict[str, str],
    manifest: dict,
    reference: dict[str, torch.Tensor] | None = None,
    rounding: Rounding = RTN,
) -> int:
    """Write the artifact into a temporary sibling and rename it into place; return the weight bytes."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    tensors, entries = pack_state(model, assignment, rounding)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS))
        if reference:
            save_file(reference, str(tmp / REFERENCE))
        tmp.chmod(0o755)  # mkdtemp makes it private; the artifact is meant to be shared
        body = {**manifest, "format_version": FORMAT_VERSION, "tensors": entries, "layers_shapes": layer_shapes(model)}
        (tmp / MANIFEST).write_text(json.dumps(body, indent=1, sort_keys=True))
        if out_dir.exists():
            out_dir.rmdir()  # only an empty folder may be replaced; the CLI checked that before starting
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sum(e.get("bytes", 0) for e in entries.values()) + sum(
        tensors[k].numel() * tensors[k].element_size() for k, e in entries.items() if e["format"] == "raw"
    )


def read(art_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """An artifact's manifest and stored tensors, read once."""
    from safetensors.torch import load_file

    art_dir = Path(art_dir)
    return json.loads((art_dir / MANIFEST).read_text()), load_file(str(art_dir / WEIGHTS))


def load(art_dir: Path) -> tuple[nn.Module, dict]:
    """The model an artifact stands for, with unpacked (simulated) weights, and its manifest."""
    manifest, stored = read(art_dir)
    return build(manifest, stored), manifest


def build(manifest: dict, stored: dict[str, torch.Tensor]) -> nn.Module:
    """The model of a manifest with its stored weights unpacked."""
    from .models import build_architecture

    model = build_architecture(manifest["arch"], smoke=manifest.get("smoke", False))
    resize_to(model, manifest["layers_shapes"])
    state = {}
    for key, entry in manifest["tensors"].items():
        fmt = entry["format"]
        if fmt == "alias":
            continue
        if fmt == "raw":
            state[key] = stored[key]
            continue
        suffixes = [
            k[len(key) + 1 :] for k in stored if k.startswith(key + ".") and k[len(key) + 1 :] in ("q", "scale", "zero")
        ]
        packed = {s: stored[f"{key}.{s}"] for s in suffixes} if suffixes else {"": stored[key]}
        state[key] = unpack(packed, fmt, tuple(entry["shape"]))
    for key, entry in manifest["tensors"].items():
        if entry["format"] == "alias":
            state[key] = state[entry["of"]]
    model.load_state_dict(state, strict=True)
    return model.eval()


def stored_packs(manifest: dict, stored: dict[str, torch.Tensor]) -> dict[str, tuple[str, dict[str, torch.Tensor]]]:
    """{layer: (format, packed tensors)} for the quantized weights as the artifact stores them."""
    out = {}
    for key, entry in manifest["tensors"].items():
        if entry["format"] in ("alias", "raw", FULL, "bf16") or not key.endswith(".weight"):
            continue
        out[key.removesuffix(".weight")] = (entry["format"], {s: stored[f"{key}.{s}"] for s in ("q", "scale", "zero")
                                                              if f"{key}.{s}" in stored})
    return out


def to_kernels(model: nn.Module, packs: dict[str, tuple[str, dict[str, torch.Tensor]]],
               device: torch.device) -> tuple[nn.Module, dict[str, int]]:
    """The model in bf16 on `device`, its int4 and fp8 Linear layers replaced by the kernels' modules
    built from the stored packed tensors (not from the unpacked weights: nothing is re-rounded).
    Returns it and how many layers each kind of module runs."""
    from .quantize import has_kernel, kernel_layer, set_module

    model = model.to(device=device, dtype=torch.bfloat16)
    modules = dict(model.named_modules())
    counts: dict[str, int] = {}
    for name, (fmt, packed) in packs.items():
        layer = modules.get(name)
        if layer is None or not has_kernel(layer, fmt, device):
            continue
        new = kernel_layer(layer, fmt, {k: v.to(device) for k, v in packed.items()}, torch.bfloat16)
        set_module(model, name, new)
        counts[type(new).__name__] = counts.get(type(new).__name__, 0) + 1
    return model, counts


def evaluate(art_dir: Path, device: str = "cpu") -> dict:
    from safetensors.torch import load_file

    from .models import make_task

    manifest, stored = read(art_dir)
    model = build(manifest, stored)
    task = make_task(manifest["arch"], model=model, smoke=manifest.get("smoke", False))
    ref_path = Path(art_dir) / REFERENCE
    if ref_path.exists():
        ref = load_file(str(ref_path))
        task.reference_eval = [ref[f"eval.{i}"] for i in range(len(task.eval_batches))]
    static = (manifest.get("fp8_inputs") or {}).get("mode") == "static"
    if device == "cpu" and not static:
        return {"model": manifest["model"], "quality": task.quality(model), **task.extra_quality(model)}
    if device != "cpu" and not torch.cuda.is_available():
        raise BadInput("--device cuda asked for, but no CUDA device is visible")
    if static:
        return serve_static(manifest, model, task, device)
    executed, counts = to_kernels(model, stored_packs(manifest, stored), torch.device(device))
    unpacked = sum(m.weight.numel() for m in executed.modules() if isinstance(m, nn.Linear))
    return {
        "model": manifest["model"],
        "device": device,
        "reported_quality": manifest.get("reported_quality"),
        "executed_quality": task.quality(executed),
        **task.extra_quality(executed),
        "kernels": counts,
        "linear_params_left_bf16": unpacked,
        "gpu_bytes": sum(t.numel() * t.element_size() for t in (*executed.parameters(), *executed.buffers())),
    }


def serve_static(manifest: dict, model: nn.Module, task, device: str) -> dict:
    """An artifact of a `--fp8-inputs static` run, executed as the run did (fast_encoder.executed_encoder
    with the stored input scales): its FP8 Linears on tensor-wise FP8 GEMMs (the CPU's, on CPU)."""
    from .fast_encoder import executed_encoder
    from .fp8_linear import kernel_available

    if device != "cpu" and not kernel_available(device):
        raise BadInput("this artifact runs FP8 Linears with static input scales: it needs a GPU with FP8 tensor "
                       "cores (compute capability 8.9+) or --device cpu")
    fp8 = manifest["fp8_inputs"]
    model = model.to(device)
    executed, info = executed_encoder(model, manifest["assignment"], None, fp8.get("margin", 1.0),
                                      input_scales=fp8["input_scales"], only=fp8.get("fp8_groups"))
    return {
        "model": manifest["model"],
        "device": device,
        "reported_quality": manifest.get("reported_quality"),
        "quality": task.quality(model),
        "executed_quality": task.quality(executed),
        "reported_executed_quality": fp8.get("executed_quality"),
        **task.extra_quality(executed),
        "fp8_inputs": "static",
        "kernels": {"StaticFp8Linear": len(info["input_scales"]),
                    "PackedEmbedding": int(any(type(m).__name__ == "PackedEmbedding" for m in executed.modules()))},
        "simulated_layers": info["simulated_layers"],
        "gpu_bytes" if device != "cpu" else "bytes": sum(
            t.numel() * t.element_size() for t in (*executed.parameters(), *executed.buffers())),
    }


def main(argv: list[str]) -> int:
    device = "cpu"
    if len(argv) == 3 and argv[1] == "--device" and argv[2] in ("cpu", "cuda"):
        device = argv[2]
    elif len(argv) != 1:
        print("usage: python -m workers.compression.artifact ARTIFACT_DIR [--device cpu|cuda]", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    try:
        print(json.dumps(evaluate(Path(argv[0]), device)))
    except BadInput as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
