"""The compression engine on a CUDA GPU: torchao kernels execute the assignment (skipped without CUDA)."""

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_a_digits_run_on_cuda_matches_its_budget():
    from workers.compression import engine

    report = engine.run(engine.Options(model="digits-cnn", quantize="auto", keep_ratio=1.0, device="cuda"))
    assert report["device"] == "cuda"
    assert report["baseline"]["quality"] - report["compressed"]["quality"] <= 0.3 + 1e-9
    # The torchao-executed model is measured too, and on digits it keeps the budget as well.
    assert report["baseline"]["quality"] - report["compressed"]["executed_quality"] <= 0.3 + 1e-9
    assert report["baseline"]["weight_bytes"] / report["compressed"]["weight_bytes"] >= 4


def test_torchao_executes_int8_and_int4_linears_on_cuda():
    from workers.compression.quantize import apply_torchao

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256)).to("cuda", torch.bfloat16)
    x = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16)
    ref = model(x).float()
    quantized, simulated = apply_torchao(model, {"0": "int8", "1": "int4_g128"}, "cuda")
    assert simulated == []
    assert type(quantized[0].weight).__name__ != "Parameter"
    out = quantized(x).float()
    assert torch.nn.functional.cosine_similarity(out, ref).mean() > 0.98


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs FP8 tensor cores (sm89+)")
def test_fp8_linears_run_on_the_tensor_cores_and_compute_what_the_cpu_simulation_computes():
    from workers.compression.fp8_linear import Fp8Linear
    from workers.compression.quantize import apply_torchao, pack

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(768, 3072), torch.nn.GELU(), torch.nn.Linear(3072, 768)).cuda()
    x = torch.randn(4, 128, 768, device="cuda")
    ref = model(x).float()
    executed, simulated = apply_torchao(model.to(torch.bfloat16), {"0": "fp8_e4m3", "2": "fp8_e4m3"}, "cuda")
    assert simulated == []
    assert isinstance(executed[0], Fp8Linear)
    assert isinstance(executed[2], Fp8Linear)
    got = executed(x.to(torch.bfloat16)).float()
    cos = torch.nn.functional.cosine_similarity(got.reshape(-1, 768), ref.reshape(-1, 768), dim=1)
    assert cos.mean() > 0.99
    # The kernel path against the same layer's CPU path (simulation): equal up to accumulation order.
    layer = Fp8Linear.from_packed(pack(torch.randn(256, 512), "fp8_e4m3"), torch.randn(256), torch.bfloat16)
    inputs = torch.randn(64, 512, dtype=torch.bfloat16)
    on_cpu = layer(inputs).float()
    on_gpu = layer.cuda()(inputs.cuda()).float().cpu()
    assert (on_gpu - on_cpu).abs().max() <= 0.02 * on_cpu.abs().max()


def test_int4_linears_run_on_tinygemm_at_the_packed_grid_gptq_included():
    from workers.compression.gptq import gptq_int4
    from workers.compression.int4_linear import Int4Linear
    from workers.compression.quantize import Rounding, apply_torchao, unpack

    torch.manual_seed(0)
    layer = torch.nn.Linear(768, 3072).cuda()
    x = torch.randn(256, 768, device="cuda")
    hessian = (x.T @ x).float()
    packed = gptq_int4(layer.weight.detach(), hessian, 64)
    image = unpack(packed, "int4_g64", (3072, 768))
    want = torch.nn.functional.linear(x, image.cuda(), layer.bias).float()
    module = Int4Linear(packed, 768, 3072, 64, layer.bias, torch.float32)
    got = module(x).float()
    # bf16 inputs and bf16 scales/zeros are the only differences from the packed image.
    assert (got - want).abs().mean() <= 0.01 * want.abs().mean()
    # Through apply_torchao with the GPTQ rounding: tinygemm, not torchao, and nothing simulated.
    model = torch.nn.Sequential(layer)
    executed, simulated = apply_torchao(model, {"0": "int4_g64"}, "cuda", Rounding({"0": hessian}))
    assert simulated == []
    assert isinstance(executed[0], Int4Linear)
    assert (executed(x).float() - want).abs().mean() <= 0.01 * want.abs().mean()


def test_an_artifact_is_served_by_the_kernels_from_its_stored_packs(tmp_path):
    from workers.compression import artifact, engine

    out = tmp_path / "art"
    report = engine.run(engine.Options(model="llama-1b", smoke=True, device="cuda", keep_ratio=1.0,
                                       formats=("int4_g64", "fp8_e4m3"), max_quality_drop=0.05, out=out))
    formats = {row["format"] for row in report["layers"]}
    assert formats & {"int4_g64", "fp8_e4m3"}
    served = artifact.evaluate(out, "cuda")
    assert sum(served["kernels"].values()) >= 1
    # The kernels compute with the stored weights: the quality is the reported one, up to bf16 and
    # (for fp8 layers) the inputs' rounding.
    assert abs(served["executed_quality"] - served["reported_quality"]) <= 0.01


def test_llama_decode_compiled_with_cuda_graphs_matches_eager_and_tinygemm_matches_fused():
    from workers.compression.decode import DecodeLlama, PackedLinear
    from workers.compression.models import _build_llama
    from workers.compression.quantize import fake_quant, quantizable_layers

    w = torch.randn(256, 1024, device="cuda")
    x = torch.randn(1024, device="cuda", dtype=torch.bfloat16)
    ref = fake_quant(w, "int4_g128").float() @ x.float()
    for kernel in ("torch", "tinygemm", "triton"):
        layer = PackedLinear(w, "int4_g128", torch.bfloat16, backend=kernel)
        y = (layer.fused(x) if kernel == "triton" else layer(x)).float()
        assert torch.nn.functional.cosine_similarity(y, ref, dim=0) > 0.999, kernel

    lm = _build_llama(False, smoke=True).lm.to("cuda", torch.bfloat16).eval()
    assignment = dict.fromkeys(quantizable_layers(lm), "int4_g64")
    ids = torch.randint(0, 1024, (12,), device="cuda")
    outs = {}
    for backend in ("torch", "triton"):
        for compiled in (False, True):
            dec = DecodeLlama(lm, assignment, max_len=32, backend=backend)
            step = torch.compile(dec, mode="reduce-overhead", fullgraph=True) if compiled else dec
            with torch.inference_mode():
                outs[backend, compiled] = torch.stack(
                    [step(ids[i : i + 1], torch.tensor([i], device="cuda")).clone() for i in range(12)]
                )
    ref = outs["torch", False]
    for key, out in outs.items():
        assert torch.nn.functional.cosine_similarity(out, ref, dim=1).min() > 0.999, key


@pytest.mark.parametrize("xload", [0, 1, 2])
def test_every_int4_input_load_computes_the_dequantized_product_with_the_fusions(xload):
    """triton_decode's three ways of reading an int4 product's input (INT4_XLOAD), with the RMSNorm prologue
    and the SiLU(gate) * up epilogue, against the same products computed in fp32 from the dequantized weights."""
    from workers.compression import triton_decode as td
    from workers.compression.decode import PackedLinear
    from workers.compression.quantize import fake_quant

    g = torch.Generator(device="cuda").manual_seed(3)
    n, k = 192, 1024
    w = torch.randn(2 * n, k, device="cuda", generator=g) * 0.05
    x = torch.randn(k, device="cuda", generator=g, dtype=torch.bfloat16)
    norm = torch.rand(k, device="cuda", generator=g, dtype=torch.bfloat16) + 0.5
    layer = PackedLinear(w, "int4_g128", torch.bfloat16, backend="triton")
    xf = x.float()
    xn = xf / torch.sqrt(xf.pow(2).mean() + 1e-6) * norm.float()
    y = fake_quant(w, "int4_g128").float() @ xn
    want = torch.nn.functional.silu(y[:n].bfloat16().float()) * y[n:].bfloat16().float()
    from workers.compression.decode import int4_bytes

    q = int4_bytes(layer.q, layer.group) if layer.words else layer.q
    for bn, bk in ((4, 256), (8, 1024), (2, 512)):
        got = td.gemv(x, q, n, td.W4_GROUP, torch.bfloat16, layer.scale, layer.zero, layer.group,
                      prologue=td.RMSNORM, norm_weight=norm, epilogue=td.SILU_PAIR, config=(bn, bk, 4, 3, xload))
        got = got.float()
        assert torch.nn.functional.cosine_similarity(got, want, dim=0) > 0.9999, (bn, bk)
        assert (got - want).abs().max() < 0.02 * want.abs().max(), (bn, bk)


def _int4_case(case: str, seed: int, n: int, k: int = 2048):
    """The weights of an int4 kernel test (2n rows for the gate/up pair, group 64 for "plain_g64"): the
    generator that goes on to draw the inputs, the group, quantize.pack()'s tensors, its nibbles as
    [rows, groups, G/2] bytes and as int4 words, and the dequantized fp32 weight."""
    from workers.compression.decode import int4_words
    from workers.compression.quantize import fake_quant, pack

    g = torch.Generator(device="cuda").manual_seed(seed)
    fmt, group = ("int4_g64", 64) if case == "plain_g64" else ("int4_g128", 128)
    rows = 2 * n if case == "rmsnorm+silu_pair" else n
    w = torch.randn(rows, k, device="cuda", generator=g) * 0.05
    packed = pack(w, fmt)
    q = packed["q"].reshape(rows, k // group, group // 2)
    return g, group, packed, q, int4_words(q, group), fake_quant(w, fmt).float()


@pytest.mark.parametrize("case", ["rmsnorm+silu_pair", "residual", "silu_mul", "plain_g64"])
def test_the_int4_word_kernel_computes_the_dequantized_product_with_the_fusions(case):
    """triton_decode's kernel over interleaved int4 words (decode.int4_words), compiled, against the products
    computed in fp32 from the dequantized weights, over several tiles; and the byte kernel alongside."""
    from workers.compression import triton_decode as td
    from workers.compression.decode import int4_bytes

    n, k = 320, 2048
    g, group, packed, q, words, wd = _int4_case(case, 5, n, k)
    assert torch.equal(int4_bytes(words, group), q)
    x = torch.randn(2 * k if case == "silu_mul" else k, device="cuda", generator=g, dtype=torch.bfloat16)
    norm = torch.rand(k, device="cuda", generator=g, dtype=torch.bfloat16) + 0.5
    res = torch.randn(n, device="cuda", generator=g, dtype=torch.bfloat16)
    kw, xf = {}, x.float()
    if case == "rmsnorm+silu_pair":
        kw = dict(prologue=td.RMSNORM, norm_weight=norm, epilogue=td.SILU_PAIR)
        y = wd @ (xf / torch.sqrt(xf.pow(2).mean() + 1e-6) * norm.float())
        want = torch.nn.functional.silu(y[:n].bfloat16().float()) * y[n:].bfloat16().float()
    elif case == "residual":
        kw = dict(residual=res)
        want = wd @ xf + res.float()
    elif case == "silu_mul":
        kw = dict(prologue=td.SILU_MUL)
        want = wd @ (torch.nn.functional.silu(xf[:k]) * xf[k:])
    else:
        want = wd @ xf
    for tile in ((4, 2048, 4, 1), (8, 1024, 4, 1), (16, 1024, 8, 1), (2, 512, 2, 1), (4, 1024, 1, 1)):
        got = td.gemv(x, words, n, td.W4_WORDS, torch.bfloat16, packed["scale"], packed["zero"], group,
                      config=tile, **kw).float()
        old = td.gemv(x, q, n, td.W4_GROUP, torch.bfloat16, packed["scale"], packed["zero"], group, **kw).float()
        # the same to bf16 rounding: both accumulate in fp32, in other orders
        tol = 0.01 * want.abs().max()
        assert (got - want).abs().max() < tol, (case, tile)
        assert (got - old).abs().max() < tol, (case, tile)
        assert torch.nn.functional.cosine_similarity(got, want, dim=0) > 0.99999, (case, tile)


@pytest.mark.parametrize("case", ["rmsnorm+silu_pair", "rmsnorm_weight", "residual", "silu_mul", "plain_g64"])
def test_the_w4a8_kernel_computes_the_product_of_its_int8_rounded_input(case):
    """triton_decode's W4A8 kernel (int8 inputs, dp4a in inline assembly), compiled, against the fp32 product
    of the dequantized weights with the input rounded as decode.int8_input_blocks rounds it, over several
    tiles (rows past N included); and how far that rounding moves the product from the unrounded one."""
    from workers.compression import triton_decode as td
    from workers.compression.decode import int8_input_blocks

    n, k = 328, 2048
    g, group, packed, _, words, wd = _int4_case(case, 7, n, k)
    x = torch.randn(2 * k if case == "silu_mul" else k, device="cuda", generator=g, dtype=torch.bfloat16)
    x[17] = 60.0  # an outlier: only its own block of 32 is rounded coarser
    norm = torch.rand(k, device="cuda", generator=g, dtype=torch.bfloat16) + 0.5
    res = torch.randn(n, device="cuda", generator=g, dtype=torch.bfloat16)
    xf = x.float()
    inv_rms = 1 / torch.sqrt(xf.pow(2).mean() + 1e-6)
    kw = {}
    if case == "rmsnorm+silu_pair":
        kw = dict(prologue=td.RMSNORM, epilogue=td.SILU_PAIR)
        y, y0 = (wd @ int8_input_blocks(xf, group)) * inv_rms, (wd @ xf) * inv_rms
        want = torch.nn.functional.silu(y[:n].bfloat16().float()) * y[n:].bfloat16().float()
        unrounded = torch.nn.functional.silu(y0[:n].bfloat16().float()) * y0[n:].bfloat16().float()
    elif case == "rmsnorm_weight":
        kw = dict(prologue=td.RMSNORM, norm_weight=norm)
        want = (wd @ int8_input_blocks(xf * norm.float(), group)) * inv_rms
        unrounded = (wd @ (xf * norm.float())) * inv_rms
    elif case == "residual":
        kw = dict(residual=res)
        want, unrounded = wd @ int8_input_blocks(xf, group) + res.float(), wd @ xf + res.float()
    elif case == "silu_mul":
        kw = dict(prologue=td.SILU_MUL)
        act = torch.nn.functional.silu(xf[:k]) * xf[k:]
        want, unrounded = wd @ int8_input_blocks(act, group), wd @ act
    else:
        want, unrounded = wd @ int8_input_blocks(xf, group), wd @ xf
    for tile in ((4, 1024, 1, 1), (8, 2048, 2, 1), (16, 1024, 4, 1), (32, 512, 2, 1), (4, 4096, 4, 1)):
        got = td.gemv(x, words, n, td.W4A8_WORDS, torch.bfloat16, packed["scale"], packed["zero"], group,
                      config=tile, **kw).float()
        tol = 0.01 * want.abs().max()  # bf16 output rounding; the sums are exact integers, then fp32
        assert (got - want).abs().max() < tol, (case, tile)
        assert torch.nn.functional.cosine_similarity(got, want, dim=0) > 0.99999, (case, tile)
    # the int8 rounding itself is small next to int4's: the rounded product stays at cosine > 0.9999 of the exact one
    assert torch.nn.functional.cosine_similarity(want, unrounded, dim=0) > 0.9999, case


def test_llama_decode_with_int8_inputs_computes_what_its_torch_expression_computes():
    """The whole int4 step with W4A8 products (triton, dp4a) against the torch expressions that round the
    inputs the same way, and against the step without the rounding."""
    from workers.compression.decode import DecodeLlama, PackedLinear
    from workers.compression.models import _build_llama
    from workers.compression.quantize import quantizable_layers

    lm = _build_llama(False, smoke=True).lm.to("cuda", torch.bfloat16).eval()
    assignment = dict.fromkeys(quantizable_layers(lm), "int4_g128")
    ids = torch.randint(0, 1024, (10,), device="cuda", generator=torch.Generator(device="cuda").manual_seed(2))
    outs = {}
    for backend, a8 in (("triton", True), ("torch", True), ("triton", False)):
        dec = DecodeLlama(lm, assignment, max_len=16, backend=backend, int8_inputs=a8)
        linears = [m for m in dec.modules() if isinstance(m, PackedLinear) and m.kind == "int4"]
        assert linears
        assert all(m.a8 == a8 for m in linears), (backend, a8)
        with torch.no_grad():
            outs[backend, a8] = torch.stack([dec(ids[i : i + 1], torch.tensor([i], device="cuda")) for i in range(10)])
    cos = torch.nn.functional.cosine_similarity
    assert cos(outs["triton", True], outs["torch", True], dim=1).min() > 0.999
    assert cos(outs["triton", True], outs["triton", False], dim=1).min() > 0.99


def test_llama_decode_over_int4_words_gives_the_tokens_of_the_byte_kernel():
    """The whole int4 step with PackedLinear holding words (td.INT4_WORDS) against the same weights as
    bytes: the same greedy tokens and logits within bf16 rounding."""
    from workers.compression import triton_decode as td
    from workers.compression.decode import DecodeLlama, PackedLinear
    from workers.compression.models import _build_llama
    from workers.compression.quantize import quantizable_layers

    lm = _build_llama(False, smoke=True).lm.to("cuda", torch.bfloat16).eval()
    assignment = dict.fromkeys(quantizable_layers(lm), "int4_g128")
    ids = torch.randint(0, 1024, (10,), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    outs = {}
    for words in (False, True):
        saved, td.INT4_WORDS = td.INT4_WORDS, words
        try:
            dec = DecodeLlama(lm, assignment, max_len=16, backend="triton")
        finally:
            td.INT4_WORDS = saved
        linears = [m for m in dec.modules() if isinstance(m, PackedLinear) and m.kind == "int4"]
        assert linears
        assert all(m.words == words for m in linears), words
        with torch.no_grad():
            outs[words] = torch.stack([dec(ids[i : i + 1], torch.tensor([i], device="cuda")) for i in range(10)])
    a, b = outs[False], outs[True]
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    assert torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=1).min() > 0.9999


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9, reason="PDL needs Hopper or newer"
)
@pytest.mark.parametrize("fmt", ["int4_g128", "int4_g128+int8_inputs", "int8", "bf16"])
def test_llama_decode_with_programmatic_dependent_launch_replays_the_same_tokens_from_a_graph(fmt):
    """Every kernel launched with PDL (weights and old cache rows read before the previous kernel
    ends), the step captured as one CUDA graph: the logits of 12 tokens are bit-for-bit those of
    the plain eager step, and the caches hold the same keys and values."""
    from workers.compression.decode import DecodeLlama
    from workers.compression.models import _build_llama
    from workers.compression.quantize import quantizable_layers
    from workers.compression.triton_decode import pdl_supported

    assert pdl_supported()
    lm = _build_llama(False, smoke=True).lm.to("cuda", torch.bfloat16).eval()
    fmt, _, a8 = fmt.partition("+")
    assignment = dict.fromkeys(quantizable_layers(lm), fmt)
    ids = torch.randint(0, 1024, (12,), device="cuda")
    plain = DecodeLlama(lm, assignment, max_len=32, backend="triton", int8_inputs=bool(a8))
    fast = DecodeLlama(lm, assignment, max_len=32, backend="triton", pdl=True, int8_inputs=bool(a8))
    tok, pos = torch.zeros(1, dtype=torch.long, device="cuda"), torch.zeros(1, dtype=torch.long, device="cuda")
    with torch.inference_mode():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fast(tok, pos)  # compiles the kernels outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        fast.reset()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = fast(tok, pos)
        fast.reset()
        for i in range(12):
            tok.copy_(ids[i : i + 1])
            pos.fill_(i)
            graph.replay()
            want = plain(ids[i : i + 1], torch.tensor([i], device="cuda"))
            assert torch.equal(logits, want), i
    for a, b in zip(plain.layers, fast.layers, strict=True):
        assert torch.equal(a.k, b.k)
        assert torch.equal(a.v, b.v)
