"""phone-export on tiny models: bundles verified on the host by the runtimes the phones link, the memory
budget check, and one-line errors for bad input."""

from __future__ import annotations

import json
import sys

import pytest
from omni_model_tests import tiny
from typer.testing import CliRunner

from omni_export.export import ExportConfig, export_onnx
from phone_export import cli

runner = CliRunner()
TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 4


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    root = tmp_path_factory.mktemp("phone")
    tiny.save_tiny("llama", root / "hf")
    export_onnx(root / "hf", root / "build", ExportConfig(weights="float32", max_seq_len=128,
                parity_prompt_tokens=8, parity_decode_tokens=4), parity_text=TEXT)  # fmt: skip
    return root


def _run(*args):
    return runner.invoke(cli.app, [str(a) for a in args])


@pytest.fixture(scope="module")
def android(build):
    out = build / "android"
    result = _run("android", build / "build", "--out", out)
    assert result.exit_code == 0, result.output
    return out, result


def test_android_bundle_is_verified_by_both_runtimes(android):
    out, result = android
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"manifest.json", "dashboard.html", "tokenizer.json", "chat_template.jinja", "onnx/model.ort",
            "onnx/required_operators.config", "executorch/model.pte"} <= names  # fmt: skip
    assert not [n for n in names if n.startswith(".verify")]
    m = json.loads((out / "manifest.json").read_text())
    assert m["platform"] == "android" and m["context"] == 128 and set(m["models"]) == {"ort", "pte"}
    for fmt, model in m["models"].items():
        v, b = model["verification"], model["budget"]
        assert v["ran"] and v["passed"] and v["tokens_identical"] and v["generated"] == 32, (fmt, v)
        assert v["decode_tok_s"] > 0 and v["peak_rss"] > v["baseline_rss"]
        assert b["fits"] and b["overhead_measured"] and b["context"] == 128
        assert b["total_bytes"] == b["weights_bytes"] + b["kv_bytes"] + b["overhead_bytes"]
    assert m["models"]["pte"]["budget"]["kv_bytes"] == 128 * 2 * 2 * 2 * 16 * 4
    html = (out / "dashboard.html").read_text()
    assert html.count("<svg") == 3 and "http" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "dashboard.html" in result.stdout


def test_budget_rejects_what_does_not_fit_in_2gb(tmp_path):
    # 4 layers x (k, v) x 8 kv heads x 64 dims x 4 bytes = 16 KiB per token: 131,072 tokens need 2.1 GB
    tiny.save_tiny("llama", tmp_path / "hf", hidden_size=512, num_attention_heads=8, num_key_value_heads=8,
                   num_hidden_layers=4, max_position_embeddings=131072)  # fmt: skip
    export_onnx(tmp_path / "hf", tmp_path / "build", ExportConfig(weights="float32", max_seq_len=131072,
                parity_prompt_tokens=8, parity_decode_tokens=0), parity_text=TEXT)  # fmt: skip
    result = _run("android", tmp_path / "build", "--out", tmp_path / "b", "--budget", "2GB")
    assert result.exit_code == 1
    assert "does not fit" in result.output and "KV cache 2.15 GB at 131,072 tokens" in result.output
    assert "2.00 GB budget" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "b").exists()
    small = _run("android", tmp_path / "build", "--out", tmp_path / "b", "--budget", "1MB")
    assert small.exit_code == 1 and "the weights alone" in small.output


def test_bad_input_gets_one_line(build, tmp_path, monkeypatch):
    cases = [
        (("android", tmp_path, "--out", tmp_path / "o"), "no manifest.json (not a build folder"),
        (("android", build / "build", "--out", tmp_path / "o", "--formats", "mlpackage"),
         "format 'mlpackage': Android cannot run it"),
        (("ios", build / "build", "--out", tmp_path / "o", "--formats", "ort"), "format 'ort': iOS cannot run it"),
        (("android", build / "build", "--out", tmp_path / "o", "--budget", "lots"), "--budget 'lots'"),
        (("android", build / "build", "--out", tmp_path / "o", "--context", "4096"),
         "context 4096: the model serves at most 128 tokens"),
        (("push", build / "build", "--adb"), "not a bundle manifest"),
    ]  # fmt: skip
    for args, message in cases:
        result = _run(*args)
        assert result.exit_code == 1, (args, result.output)
        assert message in result.output and "Traceback" not in result.output, (args, result.output)
        assert len(result.output.strip().splitlines()) == 1


@pytest.mark.skipif(sys.platform == "win32", reason="PATH handling")
def test_push_without_adb_says_so(android, tmp_path, monkeypatch):
    bundle, _ = android
    monkeypatch.setenv("PATH", str(tmp_path))  # a folder with no adb in it
    result = _run("push", bundle, "--adb")
    assert result.exit_code == 1 and "adb is not on the PATH" in result.output


def test_ios_bundle_validates_core_ml_and_runs_executorch(build):
    out = build / "ios"
    result = _run("ios", build / "build", "--out", out, "--budget", "4GB", "--context", "64")
    assert result.exit_code == 0, result.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["platform"] == "ios" and set(m["models"]) == {"mlpackage", "pte"} and m["context"] == 64
    assert (out / "coreml" / "model.mlpackage" / "Manifest.json").is_file()
    core = m["models"]["mlpackage"]
    assert core["weights"] == "float16" and core["structure"]["weights"] == "float16"
    assert core["structure"]["states"]["key_cache"]["shape"] == [2, 1, 2, 64, 16]
    if sys.platform != "darwin":
        assert not core["verification"]["ran"] and "structural" in core["verification"]["how"]
    pte = m["models"]["pte"]["verification"]
    assert pte["ran"] and pte["tokens_identical"] and pte["passed"]


def test_quantized_bundle_that_drifts_is_not_written(tmp_path):
    """A tiny random model loses far more than 1% perplexity to 4 bits: the check names it, nothing is written."""
    tiny.save_tiny("llama", tmp_path / "hf", seed=3)
    export_onnx(tmp_path / "hf", tmp_path / "build", ExportConfig(weights="int4", max_seq_len=128,
                parity_prompt_tokens=8, parity_decode_tokens=4), parity_text=TEXT)  # fmt: skip
    result = _run("android", tmp_path / "build", "--out", tmp_path / "b", "--formats", "ort")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "host verification failed: ort: perplexity" in result.output and "tolerance 1%" in result.output
    assert not (tmp_path / "b").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".b.")]


@pytest.mark.slow
def test_smollm2_int4_android_bundle_passes_by_perplexity(tmp_path):
    export_onnx("smollm2-135m-instruct", tmp_path / "build", ExportConfig(weights="int4", max_seq_len=2048,
                parity_prompt_tokens=8, parity_decode_tokens=4))  # fmt: skip
    result = _run(
        "android", tmp_path / "build", "--out", tmp_path / "b", "--formats", "ort", "--budget", "2GB"
    )
    assert result.exit_code == 0, result.output
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())["models"]["ort"]
    v, b = m["verification"], m["budget"]
    assert v["passed"] and abs(v["perplexity_delta"]) <= 0.01 and v["generated"] == 32
    assert 40 < v["reference_perplexity"] < 45  # SmolLM2 on the first 4096 tokens of Hamlet
    assert b["fits"] and b["kv_bytes"] == 2048 * 46080 and b["overhead_measured"]
