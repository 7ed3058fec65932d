"""Core ML export: the stateful wrapper against the decoder (the traced computation, runnable on
Linux), structural validation of int4 / float16 / float32 packages and its one-line errors, the
architectures refused, and prediction parity where Core ML runs (macOS)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omni_model_tests import tiny

import omni_model
from omni_export.coreml import (
    QUANT_OP,
    WEIGHT_FILE,
    CoreMLConfig,
    CoreMLPackageError,
    StatefulDecoder,
    causal_mask,
    export_coreml,
    predict_parity,
    trace,
    validate_coreml,
)
from omni_export.errors import ExportError, UnsupportedExportError

CONTEXT = 64  # cache positions of the tiny packages (the tiny models' context is 128)
macos = pytest.mark.skipif(sys.platform != "darwin", reason="Core ML predicts on macOS only")


def _load(tmp_path_factory, kind: str, **overrides) -> omni_model.LoadedModel:
    folder = tmp_path_factory.mktemp(kind) / "m"
    tiny.save_tiny(kind, folder, **overrides)
    return omni_model.load(folder, fuse=False)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _load(tmp_path_factory, "llama")


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return _load(tmp_path_factory, "qwen3")


@pytest.fixture(scope="module")
def packages(llama, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """The tiny Llama as int4 and float16 packages: weights -> (path, export summary)."""
    out = tmp_path_factory.mktemp("coreml")
    made = {}
    for weights in ("int4", "float16"):
        path = out / f"{weights}.mlpackage"
        made[weights] = path, export_coreml(llama, path, CoreMLConfig(weights=weights, max_seq_len=CONTEXT))
    return made


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg
    return msg


def _run(module, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    """Logits (1, S, V): a prefill of `prompt` tokens, then one token at a time."""
    spans = [(0, prompt)] + [(p, p + 1) for p in range(prompt, ids.shape[1])]
    with torch.no_grad():
        return torch.cat([module(ids[:, a:b].int(), torch.from_numpy(causal_mask(a, b - a, np.float32)))
                          for a, b in spans], dim=1)  # fmt: skip


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_traced_wrapper_matches_the_decoder(kind, request):
    """The module export_coreml converts, run in PyTorch: T and S stay symbolic in the trace (traced
    on 2 tokens, run on a 9-token prefill and 6 decode steps), the cache is written in place."""
    lm = request.getfixturevalue(kind)
    ids = torch.randint(0, tiny.VOCAB, (1, 15), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = lm.model(ids)  # (1, S, V), no cache
        cache = lm.model.make_cache(max_len=CONTEXT, dtype=torch.float16)
        ref16 = torch.cat(
            [lm.model(ids[:, :9], cache)] + [lm.model(ids[:, p : p + 1], cache) for p in range(9, 15)], 1
        )
    exact = trace(StatefulDecoder(lm.model, CONTEXT, torch.float32).eval())
    assert (_run(exact, ids, 9) - ref).abs().max() <= 1e-4
    # As exported: a float16 cache, against the decoder with a float16 cache.
    exported = trace(StatefulDecoder(lm.model, CONTEXT).eval())
    assert (_run(exported, ids, 9) - ref16).abs().max() <= 1e-4
    assert exported.key_cache.dtype == torch.float16 and exported.key_cache[:, :, :, :15].abs().sum() > 0
    assert exported.key_cache[:, :, :, 15:].abs().sum() == 0  # nothing written past the sequence


@pytest.mark.parametrize("weights", ["int4", "float16"])
def test_packages_pass_structural_validation(packages, llama, weights):
    path, summary = packages[weights]
    cfg = llama.config
    assert (path / "Manifest.json").is_file() and summary["path"] == str(path)
    assert not list(path.parent.glob(".*.tmp"))  # the staging folder is gone
    figures = validate_coreml(path, cfg, CoreMLConfig(weights=weights, max_seq_len=CONTEXT))
    assert figures["inputs"]["input_ids"] == {
        "dtype": "INT32",
        "shape": [1, 1],
        "ranges": [(1, 1), (1, CONTEXT)],
    }
    assert figures["inputs"]["causal_mask"]["ranges"] == [(1, 1), (1, 1), (1, CONTEXT), (1, CONTEXT)]
    cache = {"dtype": "FLOAT16", "shape": [cfg.n_layers, 1, cfg.n_kv_heads, CONTEXT, cfg.head_size]}
    assert figures["states"] == {"key_cache": cache, "value_cache": cache}
    assert figures["outputs"]["logits"]["shape"] == [1, "T", cfg.vocab_size]
    ops = figures["op_types"]
    assert ops["read_state"] > 0 and ops["slice_update"] == 2 * cfg.n_layers  # keys and values per layer
    projections = 7 * cfg.n_layers + 2  # and the head and the embedding (untied here)
    assert figures["int4_tensors"] == ops.get(QUANT_OP, 0) == (projections if weights == "int4" else 0)
    assert summary["weight_bytes"] == (path / WEIGHT_FILE).stat().st_size


def test_int4_weights_are_near_a_quarter_of_float16(packages):
    int4, f16 = (packages[w][1]["weight_bytes"] for w in ("int4", "float16"))
    # 4.5 bits per weight (a float16 scale per 32) against 16; norms, biases and the rotary tables
    # stay float16, which weighs more in a tiny model than in a real one.
    assert 0.26 < int4 / f16 < 0.36


def test_qwen3_converts_to_float32_silently_reporting_progress(qwen3, tmp_path, capfd):
    """q/k norm, float32 weights and compute (a float32 mask), and nothing printed on the way."""
    config, steps = CoreMLConfig(weights="float32", max_seq_len=CONTEXT), []
    summary = export_coreml(
        qwen3, tmp_path / "q.mlpackage", config, on_progress=lambda *step: steps.append(step)
    )
    assert capfd.readouterr() == ("", "")
    assert [d for _, d, _ in steps] == [0, 1, 2, 3, 4] and steps[-1] == ("done", 4, 4)
    figures = validate_coreml(tmp_path / "q.mlpackage", qwen3.config, config)
    assert figures["inputs"]["causal_mask"]["dtype"] == "FLOAT32" and figures["int4_tensors"] == 0
    assert summary["weight_bytes"] == figures["weight_bytes"] and summary["compute_precision"] == "float32"


def test_validation_rejects_a_package_of_another_format_or_model(packages, llama, qwen3):
    int4, _ = packages["int4"]
    with pytest.raises(CoreMLPackageError) as e:
        validate_coreml(int4, llama.config, CoreMLConfig(weights="float16", max_seq_len=CONTEXT))
    assert QUANT_OP in _one_line(e)
    with pytest.raises(CoreMLPackageError) as e:
        validate_coreml(
            packages["float16"][0], llama.config, CoreMLConfig(weights="int4", max_seq_len=CONTEXT)
        )
    assert "float weight in an int4 package" in _one_line(e)
    with pytest.raises(CoreMLPackageError) as e:
        validate_coreml(int4, llama.config, CoreMLConfig(max_seq_len=32))
    assert "input 'input_ids'" in _one_line(e)
    with pytest.raises(CoreMLPackageError) as e:
        validate_coreml(int4, qwen3.config, CoreMLConfig(max_seq_len=CONTEXT))
    _one_line(e)


def test_validation_rejects_damaged_packages(packages, llama, tmp_path):
    config = CoreMLConfig(max_seq_len=CONTEXT)

    def damaged(name: str) -> Path:
        path = tmp_path / f"{name}.mlpackage"
        shutil.copytree(packages["int4"][0], path)
        return path

    gone = damaged("gone")
    (gone / WEIGHT_FILE).unlink()
    with pytest.raises(CoreMLPackageError) as e:
        validate_coreml(gone, llama.config, config)
    assert "weight.bin is missing" in _one_line(e)
    short = damaged("short")
    data = (short / WEIGHT_FILE).read_bytes()
    (short / WEIGHT_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CoreMLPackageError) as e:
        validate_coreml(short, llama.config, config)
    assert "weight.bin holds" in _one_line(e)
    garbled = damaged("garbled")
    (garbled / "Data/com.apple.CoreML/model.mlmodel").write_bytes(b"\x00not a protobuf\xff" * 7)
    with pytest.raises(CoreMLPackageError) as e:
        validate_coreml(garbled, llama.config, config)
    assert "unreadable" in _one_line(e)
    with pytest.raises(CoreMLPackageError) as e:
        validate_coreml(tmp_path / "nothing.mlpackage", llama.config, config)
    _one_line(e)


def test_export_refuses_paths_that_are_not_packages(llama, tmp_path):
    (tmp_path / "mine.mlpackage").mkdir()
    (tmp_path / "mine.mlpackage" / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError) as e:
        export_coreml(llama, tmp_path / "mine.mlpackage")
    assert "not a Core ML package" in _one_line(e)
    assert (tmp_path / "mine.mlpackage" / "notes.txt").read_text() == "keep me"
    with pytest.raises(ExportError) as e:
        export_coreml(llama, tmp_path / "model.bin")
    assert ".mlpackage" in _one_line(e)


@pytest.mark.parametrize(
    ("kind", "overrides", "words"),
    [("mixtral", {}, "mixture-of-experts"), ("deepseek_v3", {}, "latent attention"),
     ("mistral", {"sliding_window": 16}, "sliding-window")],
)  # fmt: skip
def test_unsupported_architectures_are_refused(tmp_path_factory, kind, overrides, words):
    lm = _load(tmp_path_factory, kind, **overrides)
    with pytest.raises(UnsupportedExportError) as e:
        export_coreml(lm, tmp_path_factory.mktemp("x") / "m.mlpackage", CoreMLConfig(max_seq_len=CONTEXT))
    assert words in _one_line(e)


@pytest.mark.parametrize(
    ("field", "value"),
    [("weights", "int8"), ("block_size", 48), ("max_seq_len", 0), ("cache_dtype", "float32")],
)
def test_config_is_validated(field, value):
    with pytest.raises(UnsupportedExportError) as e:
        CoreMLConfig(**{field: value})
    assert field in _one_line(e)


@macos
@pytest.mark.export
def test_prediction_matches_pytorch_on_macos(llama, packages, tmp_path):
    ids = torch.randint(0, tiny.VOCAB, (24,), generator=torch.Generator().manual_seed(1))
    f32 = tmp_path / "f32.mlpackage"
    export_coreml(llama, f32, CoreMLConfig(weights="float32", max_seq_len=CONTEXT))
    p = predict_parity(f32, llama, ids, decode_steps=8)
    assert p["max_abs_logits_diff_prefill"] <= 1e-3 and p["max_abs_logits_diff_decode"] <= 1e-3
    assert p["greedy_agreement"] == 1.0
    p16 = predict_parity(packages["float16"][0], llama, ids, decode_steps=8)
    assert p16["max_abs_logits_diff_decode"] <= 0.1 and p16["greedy_agreement"] >= 0.9


@pytest.mark.slow
def test_importing_coremltools_prints_nothing():
    code = "from omni_export.coreml import _coremltools; _coremltools()"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert (run.stdout, run.stderr) == ("", "")


@pytest.mark.slow
def test_smollm2_converts_to_int4_and_validates(tmp_path):
    lm = omni_model.load("smollm2-135m-instruct", fuse=False)
    config = CoreMLConfig(weights="int4", max_seq_len=2048)
    t0 = time.perf_counter()
    summary = export_coreml(lm, tmp_path / "smollm2.mlpackage", config)
    seconds = time.perf_counter() - t0
    cfg = lm.config
    assert summary["int4_tensors"] == 7 * cfg.n_layers + 1  # the head is tied to the embedding
    assert summary["states"]["key_cache"]["shape"] == [cfg.n_layers, 1, cfg.n_kv_heads, 2048, cfg.head_size]
    # 4.5 bits per weight: about 0.28 bytes per parameter, plus float16 norms, biases and rope tables.
    assert summary["weight_bytes"] < 0.3 * 2 * cfg.n_params()
    assert (
        validate_coreml(tmp_path / "smollm2.mlpackage", cfg, config)["weight_bytes"]
        == summary["weight_bytes"]
    )
    print(f"SmolLM2 int4 Core ML: {seconds:.0f} s, package {summary['package_bytes'] / 2**20:.1f} MiB")
