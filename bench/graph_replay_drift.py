"""How much the same Llama-1B int4 step's graph-replay time moves over a sustained run on one GPU
(python bench/graph_replay_drift.py): one model timed 8 times (a fresh capture each, as graph_replay_ms
does), then 4 models built afresh, each with the SM and memory clocks, temperature, power and throttle
reasons read right after."""

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_decode_profile as P  # noqa: E402
import torch  # noqa: E402
from gpu_timing import graph_replay_ms  # noqa: E402

from workers.compression.decode import DecodeLlama  # noqa: E402
from workers.compression.models import _build_llama  # noqa: E402
from workers.compression.quantize import quantizable_layers  # noqa: E402

QUERY = "clocks.sm,clocks.mem,temperature.gpu,power.draw,clocks_throttle_reasons.active"


def smi() -> str:
    done = subprocess.run(["nvidia-smi", f"--query-gpu={QUERY}", "--format=csv,noheader"],
                          capture_output=True, text=True)
    return done.stdout.strip()


def main() -> int:
    if not torch.cuda.is_available():
        print("graph_replay_drift: needs a CUDA GPU", file=sys.stderr)
        return 2
    lm = _build_llama(False).lm.to("cuda", torch.bfloat16).eval()
    rows = []
    assignment = dict.fromkeys(quantizable_layers(lm), "int4_g128")
    dec = DecodeLlama(lm, assignment, max_len=512, dtype=torch.bfloat16, backend="triton", pdl=True)
    tok, pos = torch.tensor([123], device="cuda"), torch.tensor([511], device="cuda")
    with torch.inference_mode():
        for _ in range(3):
            dec(tok, pos)
    for i in range(8):
        rows.append({"same_model": True, "i": i, "ms": graph_replay_ms(dec, tok, pos), "smi": smi()})
        print(rows[-1], file=sys.stderr, flush=True)
    del dec
    for i in range(4):
        r = P.profile(lm, "triton+pdl", "int4", smoke=False, graphs=True, raw=True)
        rows.append({"same_model": False, "i": i, "ms": r["latency_ms_per_token"], "smi": smi()})
        print(rows[-1], file=sys.stderr, flush=True)
    print(json.dumps({"benchmark": "graph replay drift", "gpu": torch.cuda.get_device_name(), "query": QUERY,
                      "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
