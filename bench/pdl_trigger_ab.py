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
# the trigger of a product by its shape's name (above); products not named keep triton_decode.PDL_TRIGGER's
trigger: dict[str, int] = {}


def by_shape(fmt: int) -> None:
    """Wrap td.gemv so that the products of weight format `fmt` take the trigger `trigger` names for their
    shape (bench/pdl_trigger_a8_ab.py uses it too)."""
    orig = td.gemv

    def gemv(x, w, n, f, *a, **k):
        kk = x.numel() // 2 if k.get("prologue") == td.SILU_MUL else x.numel()
        saved = td.PDL_TRIGGER[f]
        if f == fmt:
            td.PDL_TRIGGER[f] = trigger.get(SHAPES.get((n, kk)), saved)
        try:
            return orig(x, w, n, f, *a, **k)
        finally:
            td.PDL_TRIGGER[f] = saved

    td.gemv = gemv


def main() -> int:
    if not td.pdl_supported():
        print("pdl_trigger_ab: needs a Hopper GPU (programmatic dependent launch)", file=sys.stderr)
        return 2
    by_shape(td.W4_WORDS)
    lm = _build_llama(False).lm.to("cuda", torch.bfloat16).eval()
    rows = []
    for spec in VARIANTS:
        trigger.clear()
        trigger.update(dict.fromkeys((s for s in spec.split(",") if s), 1))  # the others: 2, PDL_TRIGGER's
        r = P.profile(lm, "triton+pdl", "int4", smoke=False, graphs=True, raw=True)
        rows.append({"early": sorted(trigger), "ms": r["latency_ms_per_token"]})
        print(rows[-1], file=sys.stderr, flush=True)
    print(json.dumps({"benchmark": "int4 step: PDL trigger per projection", "gpu": torch.cuda.get_device_name(),
                      "torch": torch.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
