"""BERT-base (random weights) on the CPU: every Linear at int4_g128, rounded to nearest or by GPTQ, simulated
in fp32; output cosine to fp32 on the task's evaluation and calibration sets and on bench-like inputs
(16 x 128 random tokens, as bench/compression.py's GPU fidelity uses 64 x 128). Prints one JSON object.

    python bench/bert_gptq_cpu.py [--out bench/results/bert-gptq-DATE-cpu2.json]
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from workers.compression.gptq import collect_hessians  # noqa: E402
from workers.compression.models import make_task  # noqa: E402
from workers.compression.quantize import RTN, Rounding, apply_simulated, quantizable_layers  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    began = time.perf_counter()
    task = make_task("bert-base")
    fp32 = task.model.eval()
    task.set_reference(fp32)
    fit, qtask = task.gptq_split()
    gptq = Rounding(collect_hessians(quantizable_layers(fp32), lambda: [fp32(*b) for b in fit]))
    linears = {n: "int4_g128" for n, m in fp32.named_modules() if isinstance(m, torch.nn.Linear) and "pooler" not in n}
    gen = torch.Generator().manual_seed(64)
    inputs = (torch.randint(1000, 30522, (16, 128), generator=gen), torch.ones(16, 128, dtype=torch.long))
    with torch.inference_mode():
        reference = fp32(*inputs).float()
    out = {"bench": "bert_gptq_cpu", "date": dt.datetime.now(dt.UTC).date().isoformat(), "layers": len(linears),
           "format": "int4_g128", "gptq_fit_batches": len(fit), "results": {}}
    for name, rounding in (("rtn", RTN), ("gptq", gptq)):
        model = apply_simulated(copy.deepcopy(fp32), linears, rounding)
        with torch.inference_mode():
            got = model(*inputs).float()
        cosine = torch.nn.functional.cosine_similarity(
            got.reshape(-1, got.shape[-1]), reference.reshape(-1, reference.shape[-1]), dim=1).mean().item()
        out["results"][name] = {"eval": round(task.quality(model), 4),
                                "calibration": round(qtask.calib_score(model), 4),
                                "bench_like_16x128": round(cosine, 4)}
    out["wall_s"] = round(time.perf_counter() - began, 1)
    text = json.dumps(out, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
