"""A/B on a GPU (python bench/l2_prefetch_ab.py [--weights int4a8,bf16] [--rounds 7]): the Llama-1B decode
step (random weights, position 511 of a 512-token cache, triton backend with PDL) as one CUDA graph per
setting of the L2 prefetch (`triton_decode.L2_PREFETCH`: off, one prefetch per 128-byte line, one bulk
prefetch per thread; `DecodeLlama.prefetch_plan`: next or ahead). One model per weight format; every
setting's graph is captured from it, then the graphs are timed in alternation, `--rounds` rounds of the
median of 50 replays each, so that the run's drift (bench/graph_replay_drift.py) falls on all settings
alike. Each setting's logits are checked against the first one's (the prefetch must not change a bit).
Prints one JSON object: per weight format and setting, the median over rounds and every round's time."""

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
from gpu_timing import cuda_median_ms  # noqa: E402

from workers.compression import triton_decode as td  # noqa: E402
from workers.compression.decode import DecodeLlama  # noqa: E402
from workers.compression.models import _build_llama  # noqa: E402
from workers.compression.quantize import quantizable_layers  # noqa: E402

# (name, triton_decode.L2_PREFETCH, DecodeLlama.prefetch_plan, triton_decode.L2_PREFETCH_MAX_MB)
SETTINGS = {
    "start": [("off", 0, "off", ""), ("lines, next", 1, "next", ""), ("bulk, next", 2, "next", ""),
              ("lines, ahead", 1, "ahead", ""), ("bulk, ahead", 2, "ahead", "")],
    "end": [("off", 0, "off", ""), ("lines at the end, next", 3, "next", ""), ("bulk at the end, next", 4, "next", ""),
            ("lines at the end, ahead", 3, "ahead", ""), ("lines at the end, next, first 2 MB", 3, "next", "2"),
            ("lines, next, first 1 MB", 1, "next", "1"), ("lines, ahead", 1, "ahead", "")],
}


def capture(dec, tok, pos, mode: int, plan: str, cap: str):
    saved = td.L2_PREFETCH, td.L2_PREFETCH_MAX_MB
    td.L2_PREFETCH, dec.prefetch_plan, td.L2_PREFETCH_MAX_MB = mode, plan, cap
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):
                dec(tok, pos)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph):
            logits = dec(tok, pos)
    finally:
        td.L2_PREFETCH, td.L2_PREFETCH_MAX_MB = saved
    return graph, logits


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--weights", default="int4a8,bf16", help="comma list of bf16, int8, int4, int4a8")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--settings", choices=sorted(SETTINGS), default="end", help="which list of settings")
    args = p.parse_args()
    if not td.pdl_supported():
        print("l2_prefetch_ab: needs a Hopper GPU (programmatic dependent launch, bulk prefetch)", file=sys.stderr)
        return 2
    lm = _build_llama(False).lm.to("cuda", torch.bfloat16).eval()
    tok, pos = torch.tensor([123], device="cuda"), torch.tensor([511], device="cuda")
    doc = {"benchmark": "llama-1b decode step: L2 prefetch of the next product's weights",
           "date": dt.datetime.now(dt.UTC).date().isoformat(), "gpu": torch.cuda.get_device_name(),
           "torch": torch.__version__, "triton": __import__("triton").__version__,
           "setup": f"one CUDA graph per setting of one DecodeLlama (triton, PDL), position 511 of 512; "
                    f"{args.rounds} alternated rounds, each the median of 50 replays after 10",
           "results": {}}
    for weights in args.weights.split(","):
        fmt = "int4_g128" if weights in ("int4", "int4a8") else weights
        assignment = {} if weights == "bf16" else dict.fromkeys(quantizable_layers(lm), fmt)
        dec = DecodeLlama(lm, assignment, max_len=512, backend="triton", pdl=True, int8_inputs=weights == "int4a8")
        graphs = []
        for name, mode, plan, cap in SETTINGS[args.settings]:
            graph, logits = capture(dec, tok, pos, mode, plan, cap)
            graph.replay()
            torch.cuda.synchronize()
            graphs.append((name, graph, logits.clone()))
        ref = graphs[0][2]
        times: dict[str, list[float]] = {name: [] for name, *_ in graphs}
        for _ in range(args.rounds):
            for name, graph, _logits in graphs:
                times[name].append(round(cuda_median_ms(graph.replay, warmup=10, repeats=50), 4))
        rows = []
        for name, graph, logits in graphs:
            graph.replay()
            torch.cuda.synchronize()
            rows.append({"setting": name, "ms_median": statistics.median(times[name]), "ms_rounds": times[name],
                         "same_logits_as_off": bool(torch.equal(logits, ref))})
            print(weights, rows[-1], file=sys.stderr, flush=True)
        doc["results"][weights] = {"weight_bytes": dec.weight_bytes(), "settings": rows}
        del dec, graphs
        torch.cuda.empty_cache()
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
