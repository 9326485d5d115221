"""A/B on a GPU (python bench/a8_step_ab.py ['{"name": [bn, bk, warps, stages, maxnreg]}']): the Llama-1B int4a8
step (random weights, position 511 of 512, triton backend with PDL) as one CUDA graph under settings of
triton_decode: whether a W4A8 product of one step skips loading a next step (A8_ONE_STEP) and the gate/up
tile, with a cap on its registers (maxnreg). The graphs are timed in alternation, 7 rounds of the median
of 50 replays; every setting must give the first one's logits. Ran with PDL_TRIGGER[W4A8_WORDS] = 2 (the
default before pdl_trigger_a8_ab.py). Prints one JSON object."""
# ruff: noqa: E401, E402, E702, I001
import json, statistics, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))  # gpu_timing (bench/workers.py must not shadow workers/)
import torch
from gpu_timing import alternated_ms, capture_graph
from workers.compression import triton_decode as td
from workers.compression.decode import DecodeLlama
from workers.compression.models import _build_llama
from workers.compression.quantize import quantizable_layers

td.PDL_TRIGGER[td.W4A8_WORDS] = 2  # as measured (llama-decode-a8-one-step-maxnreg-ab-2026-11-30-h200.json)
GU = (td.W4A8_WORDS, 8192, 2048, td.SILU_PAIR)
BASE_GU = td.TUNED[GU]
def setting(one_step, gu):
    def apply():
        td.A8_ONE_STEP = one_step
        td.TUNED[GU] = gu
    return apply
SETTINGS = {
    "old: two steps loaded, gate_up (8,1024,1)": setting(False, BASE_GU),
    "one step": setting(True, BASE_GU),
    "one step, gate_up maxnreg 128": setting(True, (*BASE_GU[:4], 128)),
    "one step, gate_up (8,512,1) maxnreg 128": setting(True, (8, 512, 1, 1, 128)),
    "one step, gate_up (8,1024,2)": setting(True, (8, 1024, 2, 1)),
}
extra = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
for k, v in extra.items():
    SETTINGS[k] = setting(True, tuple(v))

lm = _build_llama(False).lm.to("cuda", torch.bfloat16).eval()
tok, pos = torch.tensor([123], device="cuda"), torch.tensor([511], device="cuda")
assignment = dict.fromkeys(quantizable_layers(lm), "int4_g128")
dec = DecodeLlama(lm, assignment, max_len=512, backend="triton", pdl=True, int8_inputs=True)
graphs = []
for name, apply in SETTINGS.items():
    apply()
    g, out = capture_graph(dec, tok, pos)
    g.replay(); torch.cuda.synchronize()
    graphs.append((name, g, out.clone()))
times = alternated_ms({n: g for n, g, _o in graphs}, rounds=7)
ref = graphs[0][2]
res = [{"setting": n, "ms_median": statistics.median(times[n]), "ms_rounds": times[n],
        "max_abs_diff_vs_first": float((o - ref).abs().max())} for n, g, o in graphs]
for r in res:
    print(r, file=sys.stderr)
print(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": res}, indent=1))
