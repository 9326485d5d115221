"""A/B on a GPU with PDL (python bench/pdl_trigger_ab.py): which int4 products let the next kernel launch
at their start (PDL trigger 1) rather than once their sums are done (2, triton_decode.PDL_TRIGGER's
choice), per projection; the Llama-1B int4 step as one CUDA graph with PDL. The first and last rows are
the same setting, to show the drift of the run (bench/graph_replay_drift.py)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_decode_profile as P  # noqa: E402
import torch  # noqa: E402

from workers.compression import triton_decode as td  # noqa: E402
from workers.compression.models import _build_llama  # noqa: E402

SHAPES = {
    (3072, 2048): "qkv", (2048, 2048): "o", (8192, 2048): "gate_up", (2048, 8192): "down", (32000, 2048): "lm_head"
}
VARIANTS = ["", "qkv", "qkv,o", "o", "down", "qkv,o,down", "gate_up", "lm_head", ""]
orig = td.gemv
early: set[str] = set()


def gemv(x, w, n, fmt, *a, **k):
    """td.gemv with the int4 word kernel's trigger chosen by the product's shape."""
    kk = x.numel() // 2 if k.get("prologue") == td.SILU_MUL else x.numel()
    saved = td.PDL_TRIGGER[fmt]
    if fmt == td.W4_WORDS:
        td.PDL_TRIGGER[fmt] = 1 if SHAPES.get((n, kk)) in early else 2
    try:
        return orig(x, w, n, fmt, *a, **k)
    finally:
        td.PDL_TRIGGER[fmt] = saved


def main() -> int:
    if not td.pdl_supported():
        print("pdl_trigger_ab: needs a Hopper GPU (programmatic dependent launch)", file=sys.stderr)
        return 2
    td.gemv = gemv
    lm = _build_llama(False).lm.to("cuda", torch.bfloat16).eval()
    rows = []
    for spec in VARIANTS:
        early.clear()
        early.update(s for s in spec.split(",") if s)
        r = P.profile(lm, "triton+pdl", "int4", smoke=False, graphs=True, raw=True)
        rows.append({"early": sorted(early), "ms": r["latency_ms_per_token"]})
        print(rows[-1], file=sys.stderr, flush=True)
    print(json.dumps({"benchmark": "int4 step: PDL trigger per projection", "gpu": torch.cuda.get_device_name(),
                      "torch": torch.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
