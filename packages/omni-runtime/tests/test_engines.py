"""Both engines behind one protocol: the exported graph decodes like the PyTorch model, the ONNX
Runtime engine runs without torch, and a broken model folder gives one line naming the file."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omni_model_tests import tiny

import omni_model
from omni_export.export import ExportConfig, export_onnx
from omni_model.generate import generate as torch_generate
from omni_model.sampling_config import SamplingConfig
from omni_runtime import Engine, EngineError, OrtEngine, generate, generate_text
from omni_runtime.torch_engine import TorchEngine

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 4


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime")
    tiny.save_tiny("llama", root / "hf")
    cfg = ExportConfig(weights="float32", parity_prompt_tokens=16, parity_decode_tokens=8)
    manifest = export_onnx(root / "hf", root / "onnx", cfg, parity_text=TEXT)
    return root / "hf", root / "onnx", manifest


def test_export_writes_a_complete_folder(exported):
    _, folder, manifest = exported
    names = {p.name for p in folder.iterdir()}
    assert {
        "manifest.json",
        "model.onnx",
        "model.onnx.data",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= names
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".onnx.")]  # no temporary left
    p = manifest["parity"]
    assert p["max_abs_logits_diff_prefill"] <= 1e-4 and p["max_abs_logits_diff_decode"] <= 1e-4
    assert p["greedy_tokens_agreeing"] == p["greedy_tokens_compared"] == 9
    assert (
        manifest["kv"]["bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    )  # layers * (k, v) * kv heads * head dim * 4


def test_engines_follow_the_protocol_and_agree(exported):
    hf, folder, _ = exported
    ort_engine, torch_engine = OrtEngine(folder), TorchEngine(omni_model.load(hf))
    assert isinstance(ort_engine, Engine) and isinstance(torch_engine, Engine)
    ids = list(np.random.default_rng(0).integers(0, 256, 40))
    full = {e.name: e.forward(ids, last_only=False) for e in (ort_engine, torch_engine)}
    assert np.abs(full["onnx"] - full["torch"]).max() <= 1e-4
    for e in (ort_engine, torch_engine):  # cached steps, with a rollback in the middle
        e.reset()
        steps = [e.forward(ids[:30], last_only=False)]
        steps += [e.forward([t]) for t in ids[30:35]]
        e.rollback(2)
        steps = [steps[0], *steps[1:4]] + [e.forward([t]) for t in ids[33:]]
        assert e.seq_len == 40
        assert np.abs(np.concatenate(steps) - full[e.name]).max() <= 1e-4, e.name


def test_chunked_prefill_equals_one_call(exported):
    ids = list(np.random.default_rng(3).integers(0, 256, 50))
    whole = OrtEngine(exported[1], prefill_chunk=64).forward(ids, last_only=False)
    chunked = OrtEngine(exported[1], prefill_chunk=16)
    assert np.abs(chunked.forward(ids, last_only=False) - whole).max() <= 1e-4
    assert chunked.seq_len == 50
    chunked.reset()
    assert np.abs(chunked.forward(ids)[-1] - whole[-1]).max() <= 1e-4


def test_short_multi_row_calls_reuse_a_binding_and_return_their_own_rows(exported):
    """Verification-sized calls share one binding per row count and one logits buffer: what a call
    returned must survive the next call, and every call must match a fresh engine's rows."""
    ids = list(np.random.default_rng(4).integers(0, 256, 24))
    whole = OrtEngine(exported[1]).forward(ids, last_only=False)
    e = OrtEngine(exported[1])
    e.forward(ids[:12])
    parts = [e.forward(ids[s : s + 4], last_only=False) for s in (12, 16, 20)]  # one binding, three calls
    assert np.abs(np.concatenate(parts) - whole[12:]).max() <= 1e-4
    e.rollback(8)
    again = e.forward(ids[16:19], last_only=False)  # a second row count, then back to one row
    assert np.abs(again - whole[16:19]).max() <= 1e-4
    assert np.abs(e.forward([ids[19]]) - whole[19]).max() <= 1e-4


def test_greedy_generation_is_identical_across_engines(exported):
    hf, folder, _ = exported
    lm = omni_model.load(hf)
    cfg = SamplingConfig(max_new_tokens=32, stop_token_ids=frozenset())
    prompt = lm.tokenizer.encode("To be, or not")
    ref = torch_generate(lm.model, prompt, cfg).token_ids
    assert generate(OrtEngine(folder), prompt, cfg).token_ids == ref
    assert generate(TorchEngine(lm), prompt, cfg).token_ids == ref
    text = generate_text(OrtEngine(folder), lm.tokenizer, "To be, or not", cfg).text
    assert text == lm.tokenizer.decode(list(ref))


def test_onnx_engine_imports_no_torch(exported):
    _, folder, _ = exported
    code = (
        "import sys\n"
        "from omni_model.tokenizer import Tokenizer\n"
        "from omni_model.sampling_config import SamplingConfig\n"
        "from omni_runtime import OrtEngine, generate_text\n"
        f"e = OrtEngine({str(folder)!r})\n"
        f"r = generate_text(e, Tokenizer.from_hf_folder({str(folder)!r}), 'To be', SamplingConfig(max_new_tokens=4))\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "print(r.n_generated, bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "[]", out.stdout


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "m"))


def test_bad_folders_are_one_line_errors(exported, tmp_path):
    _, folder, _ = exported
    cases = []
    bare = tmp_path / "bare"
    bare.mkdir()
    cases.append((bare, "no manifest.json"))
    broken = _copy(folder, tmp_path)
    (broken / "manifest.json").write_text("{not json")
    cases.append((broken, "not readable JSON"))
    for path, what in cases:
        with pytest.raises(EngineError, match=what) as info:
            OrtEngine(path)
        assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_manifest_that_does_not_match_the_graph(exported, tmp_path):
    m = _copy(exported[1], tmp_path)
    data = json.loads((m / "manifest.json").read_text())
    data["kv"]["n_layers"] = 3
    (m / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(EngineError, match="does not match the graph"):
        OrtEngine(m)
    (m / "model.onnx").unlink()
    with pytest.raises(EngineError, match=r"model\.onnx: no such file"):
        OrtEngine(m)


def test_requests_out_of_range(exported):
    e = OrtEngine(exported[1], max_seq_len=16)
    with pytest.raises(EngineError, match="max_seq_len of 16"):
        e.forward(list(range(17)))
    with pytest.raises(EngineError, match="token ids"):
        e.forward([10**6])
    with pytest.raises(EngineError, match="roll back"):
        e.rollback(1)
