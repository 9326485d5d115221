"""`python -m workers.compression` as a runner calls it: real processes, real files, no downloads."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from workers.compression import engine, models

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}

torch.set_num_threads(1)  # the test machine is small and shared


def compression(*args, timeout=240):
    return subprocess.run(
        [sys.executable, "-m", "workers.compression", *args],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "digits"
    proc = compression(
        "--model",
        "digits-cnn",
        "--quantize",
        "auto",
        "--keep-ratio",
        "0.7",
        "--max-quality-drop",
        "1.1",
        "--prune-steps",
        "2",
        "--recovery-steps",
        "80",
        "--json-lines",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc, out


def test_a_digits_run_prints_progress_lines_then_the_report_last(digits_run):
    proc, _ = digits_run
    lines = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    progress = [line for line in lines[:-1] if line["type"] == "progress"]
    stages = [p["stage"] for p in progress]
    assert {"baseline", "prune", "recover", "sensitivity", "evaluate", "done"} <= set(stages)
    assert all(0 <= p["pct"] <= 100 for p in progress)
    report = lines[-1]
    assert report["type"] == "result"
    for key in ("model", "device", "quality_metric", "baseline", "compressed", "layers", "simulated", "wall_s"):
        assert key in report
    for side in ("baseline", "compressed"):
        assert set(report[side]) >= {"quality", "weight_bytes", "params", "macs", "latency_ms"}
    # The sensitivities are not in the quality metric's units for a classifier: the report says what they are.
    assert report["quality_metric"].startswith("top-1 accuracy (%)")
    assert "probability of the true class" in report["sensitivity_metric"]
    for layer in report["layers"]:
        assert set(layer) >= {"name", "format", "sensitivity", "bytes", "kept"}


def test_a_digits_run_prunes_and_quantizes_within_its_budget(digits_run):
    report = json.loads(digits_run[0].stdout.strip().splitlines()[-1])
    base, comp = report["baseline"], report["compressed"]
    assert base["params"] / comp["params"] >= 2.0
    assert comp["macs"] < base["macs"]
    assert base["weight_bytes"] / comp["weight_bytes"] >= 8.0
    assert base["quality"] - comp["quality"] <= 1.1
    assert report["simulated"] is True  # convolutions (and shapes the CPU int4 kernel refuses) are simulated
    # What ran (kernels where they took a layer, the rest simulated) is scored too, and keeps the budget.
    assert base["quality"] - comp["executed_quality"] <= 1.1
    assert report["quantization"]["rounding"].startswith("gptq")  # the default
    # the assignment spends the task's share of what pruning left of the budget on calibration data
    q = report["quantization"]
    assert q["calibration_target"] == pytest.approx(0.9 * q["budget"])
    assert q["measured_calib_drop"] <= q["calibration_target"]
    assert {layer["kept"] for layer in report["layers"] if layer["name"] != "classifier.3"} == {0.7}


def test_the_artifact_reloads_in_a_fresh_process_with_the_reported_quality(digits_run):
    proc, out = digits_run
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {p.name for p in out.iterdir()} == {"manifest.json", "model.safetensors"}
    reload = subprocess.run(
        [sys.executable, "-m", "workers.compression.artifact", str(out)],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert reload.returncode == 0, reload.stderr[-2000:]
    assert json.loads(reload.stdout.strip().splitlines()[-1])["quality"] == report["compressed"]["quality"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["layers_shapes"]["features.0"]["weight"] == [28, 1, 3, 3]
    int4 = [k for k, e in manifest["tensors"].items() if e["format"].startswith("int4")]
    assert int4, "expected at least one int4 layer"
    assert all(
        manifest["tensors"][k]["bytes"] < 4 * torch.Size(manifest["tensors"][k]["shape"]).numel() / 4 for k in int4
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_serving_an_artifact_on_a_gpu_that_is_not_there_is_refused(digits_run):
    _, out = digits_run
    for args in ([str(out), "--device", "cuda"], [str(out), "--device", "tpu"], [str(out), "extra"]):
        proc = subprocess.run([sys.executable, "-m", "workers.compression.artifact", *args], cwd=REPO, env=ENV,
                              capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "no CUDA device" in subprocess.run(
        [sys.executable, "-m", "workers.compression.artifact", str(out), "--device", "cuda"], cwd=REPO, env=ENV,
        capture_output=True, text=True, timeout=120, check=False).stderr


def refused(proc, out: Path | None = None):
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stdout == ""
    if out is not None:
        assert not out.exists()
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    return proc.stderr


def test_it_refuses_an_unknown_model(tmp_path):
    err = refused(compression("--model", "gpt-17", "--json", "--out", str(tmp_path / "o")), tmp_path / "o")
    assert "unknown model" in err


def test_it_refuses_an_unknown_rounding(tmp_path):
    err = refused(
        compression("--model", "digits-cnn", "--rounding", "stochastic", "--json", "--out", str(tmp_path / "o")),
        tmp_path / "o",
    )
    assert "--rounding must be gptq or rtn" in err


@pytest.mark.parametrize("ratio", ["0", "-0.5", "1.5", "nan-ish"])
def test_it_refuses_a_keep_ratio_outside_zero_to_one(ratio, tmp_path):
    refused(
        compression("--model", "digits-cnn", "--keep-ratio", ratio, "--json", "--out", str(tmp_path / "o")),
        tmp_path / "o",
    )


@pytest.mark.parametrize(("model", "drop", "words"), [("digits-cnn", "2", "only resnet50"),
                                                       ("resnet50", "-1", "must be >= 0")])
def test_it_refuses_dropping_blocks_a_model_cannot_lose(model, drop, words, tmp_path):
    err = refused(compression("--model", model, "--drop-blocks", drop, "--json", "--out", str(tmp_path / "o")),
                  tmp_path / "o")
    assert words in err


def test_it_refuses_an_upload_that_is_not_safetensors(tmp_path):
    pt = tmp_path / "weights.pt"
    torch.save(models.DigitsCNN().state_dict(), pt)
    err = refused(compression("--upload", str(pt), "--arch", "digits-cnn", "--json"))
    assert "safetensors" in err
    fake = tmp_path / "weights.safetensors"
    fake.write_bytes(pt.read_bytes())  # a pickle by another name
    err = refused(
        compression("--upload", str(fake), "--arch", "digits-cnn", "--json", "--out", str(tmp_path / "o")),
        tmp_path / "o",
    )
    assert "not a safetensors file" in err


def test_it_refuses_weights_that_do_not_match_the_architecture(tmp_path):
    from safetensors.torch import save_file

    wrong = tmp_path / "wrong.safetensors"
    save_file(models.DigitsCNN(c1=32).state_dict(), str(wrong))
    err = refused(
        compression(
            "--upload",
            str(wrong),
            "--arch",
            "digits-cnn",
            "--quantize",
            "off",
            "--keep-ratio",
            "1",
            "--json",
            "--out",
            str(tmp_path / "o"),
        ),
        tmp_path / "o",
    )
    assert "do not match architecture 'digits-cnn'" in err


def test_an_uploaded_model_is_compressed_like_the_catalog_one(tmp_path):
    from safetensors.torch import save_file

    upload = tmp_path / "mine.safetensors"
    save_file(models.digits_cnn_trained().state_dict(), str(upload))
    opts = engine.Options(upload=upload, arch="digits-cnn", quantize="preset", keep_ratio=1.0, latency_repeats=2)
    report = engine.run(opts)
    assert report["model"] == "upload:mine.safetensors"
    assert report["baseline"]["quality"] > 90
    assert {layer["format"] for layer in report["layers"]} == {"int4_g64"}
    assert report["baseline"]["weight_bytes"] / report["compressed"]["weight_bytes"] > 6


@pytest.mark.parametrize(
    ("flag", "value", "words"),
    [("--formats", "int3", "--formats: unknown weight format 'int3'"),
     ("--linear-formats", "fp8_e4m3,int4_g0", "--linear-formats: unknown weight format 'int4_g0'"),
     ("--formats", " , ", "--formats needs at least one format")],
)
def test_it_refuses_unknown_formats(flag, value, words, tmp_path):
    err = refused(compression("--model", "digits-cnn", flag, value, "--json", "--out", str(tmp_path / "o")),
                  tmp_path / "o")
    assert words in err


def test_it_refuses_formats_the_chosen_mode_would_ignore(tmp_path):
    err = refused(compression("--model", "digits-cnn", "--quantize", "preset", "--formats", "int8", "--json",
                              "--out", str(tmp_path / "o")), tmp_path / "o")
    assert "--formats is for --quantize auto" in err


def test_linear_layers_take_only_the_formats_they_are_given(tmp_path):
    proc = compression("--model", "digits-cnn", "--keep-ratio", "1", "--formats", "int8,int4_g16",
                       "--linear-formats", "fp8_e4m3", "--rounding", "rtn", "--max-quality-drop", "1.0", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["quantization"]["formats"] == ["int8", "int4_g16"]
    assert report["quantization"]["linear_formats"] == ["fp8_e4m3"]
    kinds = {row["name"]: row for row in report["layers"]}
    model = models.make_task("digits-cnn").model
    linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    conv = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert linear
    assert conv
    assert {kinds[n]["format"] for n in linear} <= {"fp8_e4m3", "fp32"}
    assert {kinds[n]["format"] for n in conv} <= {"int8", "int4_g16", "fp32"}
    assert {kinds[n]["format"] for n in linear | conv} != {"fp32"}  # something was quantized


@pytest.mark.parametrize(("args", "words"), [
    (("--model", "digits-cnn", "--fp8-inputs", "static"), "BERT encoders only"),
    (("--model", "minilm-l6", "--fp8-inputs", "static", "--quantize", "off"), "needs quantization"),
])
def test_it_refuses_static_fp8_inputs_where_they_cannot_run(args, words, tmp_path):
    err = refused(compression(*args, "--json", "--out", str(tmp_path / "o")), tmp_path / "o")
    assert words in err


def test_static_fp8_inputs_run_the_fast_encoder_and_its_artifact_serves_the_same(tmp_path):
    """The preset puts Q/K/V in fp8_e4m3 (and the rest in int4): with static inputs Q/K/V run as one
    StaticFp8Linear per layer, the rest simulated; the artifact stores the input scales and, served
    in a fresh process, gives the executed quality the run reported."""
    out = tmp_path / "minilm"
    proc = compression("--model", "minilm-l6", "--quantize", "preset", "--keep-ratio", "1", "--rounding", "rtn",
                       "--fp8-inputs", "static", "--json", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["execution"].startswith("fast encoder")
    fp8 = report["quantization"]["fp8_inputs"]
    assert fp8["mode"] == "static"
    assert sorted(fp8["input_scales"]) == [f"layers.{i}.qkv" for i in range(6)]  # Q, K, V fused: one scale each
    assert all(0 < s < 1 for s in fp8["input_scales"].values())
    executed = report["compressed"]["executed_quality"]
    assert 0.9 < executed < 1.0  # quantized inputs and int4 elsewhere: close to, not equal to, the original
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["fp8_inputs"]["input_scales"] == fp8["input_scales"]
    # One scale per tensor, stored per row: every row of a Q/K/V weight has the same scale.
    from safetensors.torch import load_file

    stored = load_file(str(out / "model.safetensors"))
    scale = stored["bert.encoder.layer.0.attention.self.query.weight.scale"]
    assert torch.equal(scale, scale[:1].expand_as(scale))
    served = subprocess.run([sys.executable, "-m", "workers.compression.artifact", str(out)], cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=240, check=False)
    assert served.returncode == 0, served.stderr[-2000:]
    result = json.loads(served.stdout)
    assert result["kernels"]["StaticFp8Linear"] == 6
    assert result["executed_quality"] == pytest.approx(executed, abs=1e-6)
    assert result["quality"] == pytest.approx(report["compressed"]["quality"], abs=1e-6)
