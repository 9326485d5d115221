"""What an int4 decode product compiles to, without a GPU: SASS instructions per weight in the main loop.

Compiles triton_decode's int4 product — the byte kernel (`_gemv_kernel`, quantize.pack()'s order) or
the word kernel (`_w4w_kernel`, decode.int4_words' order) — for an sm_90 target with the ptxas that
ships in Triton's wheel, disassembles it (nvdisasm), and prints one JSON object: registers, the
instructions of each loop body by opcode, and the main loop's instructions per weight (loop body /
weights one thread handles per step). Pointer and size arguments are marked divisible by 16, as
Triton's launcher does at run time for the decoder's shapes; without that the loads are not vectorized.

    python bench/triton_sass.py --kernel words --bn 4 --bk 2048 --warps 2 --epilogue silu_pair
    python bench/triton_sass.py --kernel bytes --bn 32 --bk 512 --warps 8 --epilogue silu_pair

Needs Triton (CUDA builds of PyTorch bring it; on a CPU machine `pip install triton`): exit 2 without.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OP = re.compile(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(?:\.[\w.]*)?", re.M)


def loops(sass: str) -> list[Counter]:
    """Opcode counts of each loop body (a label up to a later branch back to it)."""
    lines = sass.splitlines()
    labels, bodies = {}, []
    for n, line in enumerate(lines):
        m = re.match(r"^(\.L_x_\d+):", line)
        if m:
            labels[m.group(1)] = n
        m = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if m and m.group(1) in labels and labels[m.group(1)] < n:
            bodies.append(Counter(OP.findall("\n".join(lines[labels[m.group(1)] : n + 1]))))
    return bodies


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--kernel", choices=["bytes", "words", "a8"], default="words")
    p.add_argument("--bn", type=int, default=8, help="outputs per program (pairs with --epilogue silu_pair)")
    p.add_argument("--bk", type=int, default=2048, help="inputs per step")
    p.add_argument("--warps", type=int, default=2)
    p.add_argument("--stages", type=int, default=1)
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--prologue", choices=["none", "rmsnorm", "rmsnorm_unit", "silu_mul"], default="rmsnorm",
                   help="rmsnorm_unit: an RMSNorm whose weight was folded into the product (not read)")
    p.add_argument("--epilogue", choices=["none", "silu_pair"], default="none")
    p.add_argument("--xload", type=int, default=1, help="bytes kernel: how the input is read (INT4_XLOAD)")
    p.add_argument("--maxnreg", type=int, default=None, help="cap the registers per thread (ptxas .maxnreg)")
    p.add_argument("--one-step", action="store_true", help="a8: K == BLOCK_K (no next step loaded ahead)")
    args = p.parse_args()
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        print("triton_sass: Triton is not installed (pip install triton)", file=sys.stderr)
        return 2
    from workers.compression import triton_decode as td

    words = args.kernel in ("words", "a8")
    fn = {"words": td._w4w_kernel, "a8": td._w4a8_kernel, "bytes": td._gemv_kernel}[args.kernel]
    sig = {"x_ptr": "*bf16", "w_ptr": "*i32" if words else "*u8", "s_ptr": "*fp16", "z_ptr": "*fp16",
           "nw_ptr": "*bf16", "res_ptr": "*bf16", "out_ptr": "*bf16", "N": "i32", "K": "i32", "stride_w": "i32"}
    if args.kernel == "words":
        sig["magic_even"] = sig["magic_odd"] = "i32"
    pro = {"none": td.NONE, "rmsnorm": td.RMSNORM, "rmsnorm_unit": td.RMSNORM_UNIT,
           "silu_mul": td.SILU_MUL}[args.prologue]
    epi = td.SILU_PAIR if args.epilogue == "silu_pair" else 0
    consts = {"EPS": 1e-6, "G": args.group, "PRO": pro, "EPI": epi, "HAS_RES": False,
              "BLOCK_N": args.bn, "BLOCK_K": args.bk, "PDL": 2}
    if not words:
        consts.update(FMT=td.W4_GROUP, EVEN_K=True, XLOAD=args.xload)
    if args.kernel == "a8":
        consts["ASM"] = True
        consts["ONE_STEP"] = args.one_step
    for name in consts:
        sig[name] = "constexpr"
    div16 = [k for k, t in sig.items() if t != "constexpr" and not k.startswith("magic")]
    src = ASTSource(
        fn=fn,
        signature=sig,
        constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
        attrs={(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in div16},
    )
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": args.warps, "num_stages": args.stages, "maxnreg": args.maxnreg})
    bindir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        sass = subprocess.run([str(bindir / "nvdisasm"), "-c", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
        usage = subprocess.run([str(bindir / "cuobjdump"), "--dump-resource-usage", str(cubin)],
                               capture_output=True, text=True, check=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    if os.environ.get("TRITON_SASS_DUMP"):
        Path(os.environ["TRITON_SASS_DUMP"]).write_text(sass)
    bodies = [b for b in loops(sass) if sum(b.values()) > 8]
    main_loop = max(bodies, key=lambda b: sum(b.values())) if bodies else Counter()
    rows = 2 * args.bn if epi else args.bn
    per_thread = rows * args.bk / (32 * args.warps)  # weights one thread handles per step
    print(json.dumps({
        "kernel": args.kernel,
        "tile": {"bn": args.bn, "bk": args.bk, "warps": args.warps, "stages": args.stages},
        "prologue": args.prologue,
        "epilogue": args.epilogue,
        "registers": int(regs.group(1)) if regs else None,
        "maxnreg": args.maxnreg,
        "spill_instructions": len(re.findall(r"\b(?:LDL|STL)\b", sass)),
        "instructions": len(OP.findall(sass)),
        "main_loop_instructions": sum(main_loop.values()),
        "weights_per_thread_per_step": per_thread,
        "main_loop_instructions_per_weight": round(sum(main_loop.values()) / per_thread, 2),
        "main_loop_opcodes": dict(main_loop.most_common(16)),
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
