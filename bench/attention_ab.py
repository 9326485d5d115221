"""Experiment (reverted in the next commit). A/B on the H200: the Llama-1B step with each head's last
block combining the attention (one kernel) against the two-kernel attention, alternated, one CUDA graph with PDL."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[0]))
import llama_decode_profile as P
import torch

from workers.compression import decode
from workers.compression.models import _build_llama

orig = decode.DecodeLlama.__init__
split = {"on": False}


def init(self, *a, **k):
    orig(self, *a, **k)
    if split["on"]:
        self.att_counts = None


decode.DecodeLlama.__init__ = init
lm = _build_llama(False).lm.to("cuda", torch.bfloat16).eval()
rows = []
for _rep in range(2):
    for weights in ("int4", "bf16"):
        for mode in ("one kernel", "two kernels"):
            split["on"] = mode == "two kernels"
            r = P.profile(lm, "triton+pdl", weights, False, True, True)
            rows.append({"attention": mode, "weights": weights, "ms": r["latency_ms_per_token"]})
            print(rows[-1], flush=True)
print(json.dumps(rows))
