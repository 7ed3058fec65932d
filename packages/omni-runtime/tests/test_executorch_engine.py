"""The ExecuTorch export and engine: a .pte with prefill and decode methods over one in-program KV cache
decodes like the PyTorch model (float32), its 4-bit program computes what the 4-bit PyTorch modules do,
and broken folders give one line naming the file."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from omni_model_tests import tiny

import omni_model
from omni_export.errors import UnsupportedExportError
from omni_export.executorch import ExecuTorchConfig, calibration_ids, export_executorch, quantize_8da4w
from omni_export.smoothing import smooth
from omni_model.decoder import Decoder
from omni_model.sampling_config import SamplingConfig
from omni_runtime import Engine, EngineError, generate
from omni_runtime.executorch_engine import ExecuTorchEngine
from omni_runtime.torch_engine import TorchEngine

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 4


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("executorch")
    tiny.save_tiny("llama", root / "hf")
    out = {}
    for weights in ("float32", "int4"):
        cfg = ExecuTorchConfig(weights=weights, max_seq_len=96, prefill_chunk=16, parity_prompt_tokens=24,
                               parity_decode_tokens=24)  # fmt: skip
        out[weights] = export_executorch(
            root / "hf", root / weights, cfg, parity_text=TEXT, calibration_text=TEXT
        )
    return root, out


def test_float_program_decodes_like_pytorch(exported):
    root, manifests = exported
    m = manifests["float32"]
    assert {p.name for p in (root / "float32").iterdir()} >= {"manifest.json", "model.pte", "tokenizer.json"}
    assert not [p for p in root.iterdir() if p.name.startswith(".float32.")]  # no temporary left
    p = m["parity"]
    assert p["max_abs_logits_diff_prefill"] <= 1e-4 and p["max_abs_logits_diff_decode"] <= 1e-4
    assert p["greedy_tokens_agreeing"] == p["greedy_tokens_compared"] == 25
    assert m["kv"]["bytes"] == 96 * 2 * 2 * 2 * 16 * 4  # length * layers * (k, v) * kv heads * head dim * 4

    engine, ref = ExecuTorchEngine(root / "float32"), TorchEngine(omni_model.load(root / "hf"))
    assert isinstance(engine, Engine)
    ids = list(np.random.default_rng(0).integers(0, 256, 40))  # 40 tokens: three prefill chunks of 16
    ours, theirs = engine.forward(ids, last_only=False), ref.forward(ids, last_only=False)
    assert ours.shape == theirs.shape == (40, tiny.VOCAB)
    assert np.abs(ours - theirs).max() <= 1e-4
    assert np.abs(engine.forward([5]) - ref.forward([5])).max() <= 1e-4  # the decode method


def test_rollback_overwrites_the_rejected_entries(exported):
    root, _ = exported
    engine = ExecuTorchEngine(root / "float32")
    ids = list(range(60, 80))
    want = engine.forward([*ids, 7, 8], last_only=False)[-2:]
    engine.reset()
    engine.forward(ids)
    engine.forward([100, 101, 102], last_only=False)  # rejected by a verifier
    engine.rollback(3)
    assert engine.seq_len == 20
    got = np.concatenate([engine.forward([7]), engine.forward([8])])
    assert np.abs(got - want).max() <= 1e-4


def test_generate_greedy_matches_the_pytorch_engine(exported):
    root, _ = exported
    prompt = list(range(40, 52))
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=30)
    ours = generate(ExecuTorchEngine(root / "float32"), prompt, cfg).token_ids
    theirs = generate(TorchEngine(omni_model.load(root / "hf")), prompt, cfg).token_ids
    assert ours == theirs and len(ours) == 30


@torch.inference_mode()
def test_int4_program_computes_what_the_quantized_modules_do(exported):
    """The .pte's 4-bit kernels (XNNPACK qd8 x qb4w) against torchao's reference math for the same codes."""
    root, manifests = exported
    m = manifests["int4"]
    assert m["quantization"]["tensors"] == {"4-bit, quantized from float": 14, "8-bit per channel": 1,
                                            "8-bit per row": 1}  # fmt: skip
    assert m["file_bytes"] < 0.45 * manifests["float32"]["file_bytes"]
    lm = omni_model.load(root / "hf", fuse=False)
    model = Decoder(lm.config, init=False)
    model.load_state_dict(lm.model.state_dict())
    assert m["quantization"]["smoothing"] == {
        "alpha": 0.5,
        "calibration_tokens": 4096,
        "calibration": "given text",
    }
    factors = smooth(
        model.eval().requires_grad_(False), calibration_ids(lm, ExecuTorchConfig(), TEXT), 0.5, 32
    )
    quantize_8da4w(model, None, 32, lambda name, how: None, factors)
    ids = list(np.random.default_rng(1).integers(0, 256, 30))
    want = model(torch.tensor([ids]))[0].numpy()
    got = ExecuTorchEngine(root / "int4").forward(ids, last_only=False)
    # XNNPACK quantizes activations with its own rounding: a few codes differ from torchao's reference
    # math, and a 2-layer model with N(0, 0.2) weights amplifies each; the float model is 17x further off.
    err = np.abs(got - want)
    assert err.max() <= 0.05 * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9
    float_err = np.abs(want - lm.model(torch.tensor([ids]))[0].numpy())
    assert err.mean() <= 0.1 * float_err.mean()


def test_engine_bad_input(exported, tmp_path):
    root, _ = exported
    engine = ExecuTorchEngine(root / "float32")
    with pytest.raises(EngineError, match="max_seq_len of 96"):
        engine.forward(list(range(97)))
    with pytest.raises(EngineError, match=r"token ids must be in 0\.\.319"):
        engine.forward([320])
    with pytest.raises(EngineError, match="cannot roll back 1"):
        engine.rollback(1)
    with pytest.raises(EngineError, match=r"no manifest\.json"):
        ExecuTorchEngine(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(root / "float32", broken)
    (broken / "model.pte").write_bytes(b"not a program")
    with pytest.raises(EngineError, match="ExecuTorch cannot load it") as e:
        ExecuTorchEngine(broken)
    assert "\n" not in str(e.value)
    m = json.loads((broken / "manifest.json").read_text())
    (broken / "manifest.json").write_text(json.dumps(m | {"format": "omnicoder-onnx"}))
    with pytest.raises(EngineError, match="not an OmniCoder ExecuTorch manifest"):
        ExecuTorchEngine(broken)


def test_unsupported_architectures_are_refused(tmp_path):
    tiny.save_tiny("mixtral", tmp_path / "moe", num_local_experts=4, num_experts_per_tok=2)
    with pytest.raises(UnsupportedExportError, match="mixture-of-experts"):
        export_executorch(tmp_path / "moe", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_opening_and_running_prints_nothing(exported):
    """ExecuTorch's C++ side logs CPU probing to stderr when its thread pool starts, and torch logs a
    deprecation when torchao is imported: both silenced."""
    root, _ = exported
    code = ("from omni_runtime.executorch_engine import ExecuTorchEngine\n"
            f"e = ExecuTorchEngine({str(root / 'float32')!r})\ne.forward([1, 2, 3]); e.forward([4])\n")  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and "cpuinfo" not in proc.stderr and "[" not in proc.stderr.replace("[W", ""), (
        proc.stderr
    )
