"""A/B on a GPU with PDL (python bench/pdl_trigger_a8_ab.py [--rounds 7]): when each W4A8 product (int4
words, int8 inputs, `triton_decode._w4a8_kernel`) lets the next kernel launch, in the Llama-1B int4a8
step (random weights, position 511 of a 512-token cache) as one CUDA graph. Trigger 1: at the product's
start (the next kernel's programs load their weights beside it and wait); 2: once its sums are done;
3: once its input is there (after its wait). One model; each setting's graph is captured from it, then
the graphs are timed in alternation, `--rounds` rounds of the median of 50 replays, so that the run's
drift (bench/graph_replay_drift.py) falls on every setting alike; the logits must be the same bits
under every setting. The first and the last setting are the same. Prints one JSON object."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))  # gpu_timing (bench/workers.py must not shadow workers/)
import torch  # noqa: E402
from gpu_timing import alternated_ms, capture_graph  # noqa: E402
from pdl_trigger_ab import by_shape, trigger  # noqa: E402

from workers.compression import triton_decode as td  # noqa: E402
from workers.compression.decode import DecodeLlama  # noqa: E402
from workers.compression.models import _build_llama  # noqa: E402
from workers.compression.quantize import quantizable_layers  # noqa: E402

ALL = ("qkv", "o", "gate_up", "down", "lm_head")
SETTINGS = {
    "all at the start": dict.fromkeys(ALL, 1),
    "all once the sums are done": dict.fromkeys(ALL, 2),
    "all once the input is there": dict.fromkeys(ALL, 3),
    "at the start, gate_up once the sums are done": {**dict.fromkeys(ALL, 1), "gate_up": 2},
    "at the start, gate_up once the input is there": {**dict.fromkeys(ALL, 1), "gate_up": 3},
    "at the start, lm_head once the sums are done": {**dict.fromkeys(ALL, 1), "lm_head": 2},
    "at the start, o once the input is there": {**dict.fromkeys(ALL, 1), "o": 3},
    "all at the start (again)": dict.fromkeys(ALL, 1),
}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    if not td.pdl_supported():
        print("pdl_trigger_a8_ab: needs a Hopper GPU (programmatic dependent launch)", file=sys.stderr)
        return 2
    by_shape(td.W4A8_WORDS)
    lm = _build_llama(False).lm.to("cuda", torch.bfloat16).eval()
    tok, pos = torch.tensor([123], device="cuda"), torch.tensor([511], device="cuda")
    dec = DecodeLlama(lm, dict.fromkeys(quantizable_layers(lm), "int4_g128"), max_len=512, backend="triton",
                      pdl=True, int8_inputs=True)
    graphs = []
    for name, setting in SETTINGS.items():
        trigger.clear()
        trigger.update(setting)
        graph, logits = capture_graph(dec, tok, pos)
        graph.replay()
        torch.cuda.synchronize()
        graphs.append((name, graph, logits.clone()))
    times = alternated_ms({name: graph for name, graph, _logits in graphs}, args.rounds)
    ref = graphs[0][2]
    rows = [{"setting": name, "trigger": SETTINGS[name], "ms_median": statistics.median(times[name]),
             "ms_rounds": times[name], "same_logits": bool(torch.equal(logits, ref))}
            for name, _graph, logits in graphs]
    for r in rows:
        print(r["setting"], r["ms_median"], r["same_logits"], file=sys.stderr)
    print(json.dumps({"benchmark": "int4a8 step: PDL trigger per W4A8 projection",
                      "date": dt.datetime.now(dt.UTC).date().isoformat(), "gpu": torch.cuda.get_device_name(),
                      "torch": torch.__version__,
                      "setup": f"one CUDA graph per setting of one DecodeLlama (triton, PDL, int8 inputs), "
                               f"position 511 of 512; {args.rounds} alternated rounds, each the median of 50 "
                               "replays after 10", "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
