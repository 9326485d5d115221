"""What each kind of kernel costs the Llama-1B decode step on a GPU (python bench/llama_decode_breakdown.py
int4a8,bf16): the step (random weights, position 511 of 512, triton backend with PDL) captured as one CUDA
graph as it is and with one kind of kernel left out in all 16 layers (attention: both kernels; combine:
attention's second kernel; o; the MLP's two products; lm_head), the graphs timed in alternation (5 rounds
of the median of 50 replays). A left-out kernel passes its input on (or zeros), so the logits are
meaningless; what counts is the time saved, the kernel's marginal cost in the chain of the step, overlap
with its neighbours included. Prints one JSON object."""
# ruff: noqa: E401, E402, E702, I001
import json, statistics, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))  # gpu_timing (bench/workers.py must not shadow workers/)
import torch
from gpu_timing import alternated_ms, capture_graph
from workers.compression import triton_decode as td
from workers.compression import decode as D
from workers.compression.models import _build_llama
from workers.compression.quantize import quantizable_layers

orig_att, orig_fused = td.attention, D.PackedLinear.fused
mode = {"skip": None}
def attention(qkv, k, v, pos, cos, sin, heads, pdl=False):
    if mode["skip"] == "attention":
        return qkv[: heads * k.shape[2]]
    if mode["skip"] == "combine":
        kv_heads, t, d = k.shape
        block = min(64, t); blocks = t // block
        part = torch.empty(heads * blocks * (d + 2), dtype=torch.float32, device=qkv.device)
        td._attention_partial[(heads, blocks)](qkv, k, v, cos, sin, pos, part, t, SCALE=d**-0.5, HEADS=heads,
            GROUP=heads // kv_heads, D=d, BLOCK_T=block, PDL=pdl, **td._launch(pdl))
        return part[: heads * d]
    return orig_att(qkv, k, v, pos, cos, sin, heads, pdl=pdl)
def fused(self, x, prologue=0, norm_weight=None, eps=1e-6, residual=None, epilogue=0, pdl=False):
    n = self.out_features
    if mode["skip"] == "o" and n == 2048 and self.in_features == 2048 and residual is not None:
        return residual
    if mode["skip"] == "mlp" and epilogue == td.SILU_PAIR:
        return x.new_zeros(8192)
    if mode["skip"] == "mlp" and self.in_features == 8192:
        return residual
    if mode["skip"] == "lm_head" and n == 32000:
        return x.new_zeros(n)
    return orig_fused(self, x, prologue, norm_weight, eps, residual, epilogue, pdl)
td.attention = attention
D.PackedLinear.fused = fused

lm = _build_llama(False).lm.to("cuda", torch.bfloat16).eval()
tok, pos = torch.tensor([123], device="cuda"), torch.tensor([511], device="cuda")
res = {}
for weights in (sys.argv[1] if len(sys.argv) > 1 else "int4a8,bf16").split(","):
    fmt = "int4_g128" if weights.startswith("int4") else weights
    assignment = {} if weights == "bf16" else dict.fromkeys(quantizable_layers(lm), fmt)
    dec = D.DecodeLlama(lm, assignment, max_len=512, backend="triton", pdl=True, int8_inputs=weights == "int4a8")
    graphs = {}
    for skip in [None, "attention", "combine", "o", "mlp", "lm_head"]:
        mode["skip"] = skip
        graphs[str(skip)], _ = capture_graph(dec, tok, pos)
    times = alternated_ms(graphs, rounds=5)
    full = statistics.median(times["None"])
    res[weights] = {n: {"ms": round(statistics.median(t), 4),
                        "saved_us": round((full - statistics.median(t)) * 1000, 1)}
                    for n, t in times.items()}
    print(weights, res[weights], file=sys.stderr)
    del dec, graphs
print(json.dumps({"gpu": torch.cuda.get_device_name(),
                  "what": "int4a8/bf16 step with one kind of kernel left out (16 layers)", "results": res}, indent=1))
