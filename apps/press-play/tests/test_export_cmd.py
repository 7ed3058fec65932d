"""press-play export, then generate / eval perplexity on the exported folder with ONNX Runtime."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from typer.testing import CliRunner

from press_play import cli

runner = CliRunner()


def _export(src, out, *extra):
    result = runner.invoke(cli.app, ["export", "--model", str(src), "--out", str(out), *extra])
    assert result.exit_code == 0, result.output
    return json.loads((out / "manifest.json").read_text())


def test_export_then_generate_and_evaluate_with_onnx(tiny_model_dir, text_file, tmp_path):
    manifest = _export(tiny_model_dir, tmp_path / "onnx", "--weights", "float32", "--max-seq-len", "256")
    assert manifest["quantization"]["weights"] == "float32" and manifest["max_seq_len"] == 256
    gen = ["generate", "To be", "--raw", "--temperature", "0", "-n", "12"]
    by_engine = {}
    for engine, model in (("torch", tiny_model_dir), ("onnx", tmp_path / "onnx")):
        result = runner.invoke(cli.app, [*gen, "--model", str(model), "--engine", engine])
        assert result.exit_code == 0, result.output
        by_engine[engine] = result.stdout
    assert by_engine["onnx"] == by_engine["torch"]  # greedy: the same text from both engines
    ppl = {}
    for engine, model in (("torch", tiny_model_dir), ("auto", tmp_path / "onnx")):
        args = ["eval", "perplexity", "--model", str(model), "--engine", engine, "--text", str(text_file),
                "--context", "64", "--json"]  # fmt: skip
        result = runner.invoke(cli.app, args)
        assert result.exit_code == 0, result.output
        ppl[engine] = json.loads(result.stdout)
    assert ppl["auto"]["engine"] == "onnx" and ppl["torch"]["engine"] == "torch"
    assert math.isclose(ppl["auto"]["ppl"], ppl["torch"]["ppl"], rel_tol=1e-4)


def test_int4_export_reports_parity(tiny_model_dir, tmp_path):
    result = runner.invoke(cli.app, ["export", "--model", str(tiny_model_dir), "--out", str(tmp_path / "q"),
                                     "--weights", "int4", "--block-size", "16"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "int4 weights" in result.stdout and "greedy tokens agreeing" in result.output


def test_int8_kv_export_generates(tiny_model_dir, tmp_path):
    manifest = _export(
        tiny_model_dir, tmp_path / "q", "--weights", "float32", "--kv", "int8", "--max-seq-len", "128"
    )
    assert manifest["kv"]["dtype"] == "int8"
    result = runner.invoke(cli.app, ["generate", "To be", "--raw", "--temperature", "0", "-n", "8", "--model",
                                     str(tmp_path / "q")])  # fmt: skip
    assert result.exit_code == 0 and result.stdout.strip(), result.output


def test_bad_export_and_engine_input_is_one_line(tiny_model_dir, tmp_path):
    cases = [
        (
            ["export", "--model", str(tiny_model_dir), "--out", str(tmp_path / "x"), "--format", "tflite"],
            "--format tflite",
        ),
        (
            ["export", "--model", str(tiny_model_dir), "--out", str(tmp_path / "x"), "--weights", "int3"],
            "weights",
        ),
        (
            ["export", "--model", str(tiny_model_dir), "--out", str(tmp_path / "x"), "--kv", "int4"],
            "KV cache format must be float32 or int8",
        ),
        (["generate", "hi", "--model", str(tiny_model_dir), "--engine", "onnx"], "no manifest.json"),
        (["generate", "hi", "--model", str(tiny_model_dir), "--engine", "tpu"], "--engine tpu"),
    ]
    for args, what in cases:
        result = runner.invoke(cli.app, args)
        assert result.exit_code == 1, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and what in lines[0], result.output


def test_exported_folder_without_its_tokenizer(tiny_model_dir, tmp_path):
    _export(tiny_model_dir, tmp_path / "onnx", "--weights", "float32")
    (tmp_path / "onnx" / "tokenizer.json").unlink()
    result = runner.invoke(cli.app, ["generate", "hi", "--model", str(tmp_path / "onnx")])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "tokenizer.json: no such file" in lines[0], result.output


def test_export_executorch_then_generate_and_evaluate(tiny_model_dir, text_file, tmp_path):
    manifest = _export(tiny_model_dir, tmp_path / "et", "--format", "executorch", "--weights", "float32",
                       "--max-seq-len", "128")  # fmt: skip
    assert manifest["format"] == "omnicoder-executorch" and manifest["max_seq_len"] == 128
    gen = ["generate", "To be", "--raw", "--temperature", "0", "-n", "12"]
    texts = {}
    for engine, model in (("torch", tiny_model_dir), ("auto", tmp_path / "et")):
        result = runner.invoke(cli.app, [*gen, "--model", str(model), "--engine", engine])
        assert result.exit_code == 0, result.output
        texts[engine] = result.stdout
    assert texts["auto"] == texts["torch"]
    ppl = {}
    for engine, model in (("torch", tiny_model_dir), ("executorch", tmp_path / "et")):
        args = ["eval", "perplexity", "--model", str(model), "--engine", engine, "--text", str(text_file),
                "--context", "64", "--json"]  # fmt: skip
        result = runner.invoke(cli.app, args)
        assert result.exit_code == 0, result.output
        ppl[engine] = json.loads(result.stdout)
    assert ppl["executorch"]["engine"] == "executorch"
    assert math.isclose(ppl["executorch"]["ppl"], ppl["torch"]["ppl"], rel_tol=1e-4)
    bad = runner.invoke(cli.app, ["export", "--model", str(tiny_model_dir), "--out", str(tmp_path / "x"),
                                  "--format", "executorch", "--weights", "int8"])  # fmt: skip
    assert bad.exit_code == 1 and "the ExecuTorch export takes float32 or int4" in bad.output


def test_executorch_export_prints_only_its_own_lines(tiny_model_dir, tmp_path):
    """torch, torchao and ExecuTorch's native code log on import, lowering and load: none of it gets out."""
    proc = subprocess.run([sys.executable, "-m", "press_play.cli", "export", "--model", str(tiny_model_dir),
                           "--out", str(tmp_path / "et"), "--format", "executorch", "--weights", "int4",
                           "--max-seq-len", "64"], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert [line.split(":")[0] for line in proc.stderr.splitlines() if line.strip()] == [
        "parity against PyTorch"
    ]
    assert proc.stdout.startswith("wrote ")
