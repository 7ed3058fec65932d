"""The ONNX decoder graph against the PyTorch decoder on tiny random checkpoints of each family.

Float32 weights: the prompt's logits and 16 cached decode steps (past fed back as present) within
1e-4 of omni_model's plain decoder, which is itself held to transformers. Architectures the export
cannot express yet fail with one line naming what is missing.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from omni_model_tests import tiny

import omni_model
from omni_export.errors import UnsupportedExportError
from omni_export.onnx_decoder import GraphOptions, build_decoder_graph

VOCAB, save_tiny = tiny.VOCAB, tiny.save_tiny

CASES = {
    "llama": ("llama", {}),
    "llama-tied-yarn": ("llama", {"tie_word_embeddings": True, "rope_scaling": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}}),
    "llama-llama3-rope": ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {"head_dim": 32}),
    "mistral-sliding": ("mistral", {"sliding_window": 7}),
}  # fmt: skip


def session(lm: omni_model.LoadedModel, **opts) -> ort.InferenceSession:
    weights = {k: v.detach().float().numpy() for k, v in lm.model.state_dict().items()}
    graph = build_decoder_graph(lm.config, weights, GraphOptions(max_seq_len=128, **opts))
    return ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])


def run(s: ort.InferenceSession, cfg, ids: np.ndarray, past: list, keep: int = 0):
    total = ids.shape[1] + past[0][0].shape[2]
    feeds = {"input_ids": ids, "attention_mask": np.ones((ids.shape[0], total), np.int64),
             "logits_to_keep": np.array(keep, np.int64)}  # fmt: skip
    for i, (k, v) in enumerate(past):
        feeds[f"past_key_values.{i}.key"], feeds[f"past_key_values.{i}.value"] = k, v
    out = s.run(None, feeds)
    return out[0], [(out[1 + 2 * i], out[2 + 2 * i]) for i in range(cfg.n_layers)]


def empty(cfg, batch: int = 1) -> list:
    z = np.zeros((batch, cfg.n_kv_heads, 0, cfg.head_size), np.float32)
    return [(z, z) for _ in range(cfg.n_layers)]


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    kind, overrides = CASES[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    save_tiny(kind, folder, **overrides)
    lm = omni_model.load(folder, fuse=False)
    return request.param, lm, session(lm)


def test_prefill_and_cached_decode_match_pytorch(case):
    name, lm, s = case
    cfg = lm.config
    ids = np.random.default_rng(0).integers(0, VOCAB, (1, 40))
    with torch.no_grad():
        ref = lm.model(torch.from_numpy(ids)).numpy()
    full, _ = run(s, cfg, ids, empty(cfg))
    assert np.abs(full - ref).max() <= 1e-4, f"{name}: prefill"
    logits, past = run(s, cfg, ids[:, :24], empty(cfg))
    steps = [logits]
    for t in range(24, 40):
        logits, past = run(s, cfg, ids[:, t : t + 1], past)
        steps.append(logits)
    err = np.abs(np.concatenate(steps, axis=1) - ref).max()
    assert err <= 1e-4, f"{name}: cached decode differs by {err:.2e}"
    last, _ = run(s, cfg, ids, empty(cfg), keep=1)
    assert last.shape == (1, 1, VOCAB) and np.abs(last[:, 0] - ref[:, -1]).max() <= 1e-4


def test_float16_weights_stay_close(tmp_path):
    save_tiny("llama", tmp_path / "m")
    lm = omni_model.load(tmp_path / "m", fuse=False)
    ids = np.random.default_rng(1).integers(0, VOCAB, (1, 16))
    with torch.no_grad():
        ref = lm.model(torch.from_numpy(ids)).numpy()
    got, _ = run(session(lm, weights="float16"), lm.config, ids, empty(lm.config))
    assert np.abs(got - ref).max() <= 2e-2  # float16 rounding of random N(0, 0.2) weights


@pytest.mark.parametrize(
    "kind, overrides, what", [("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "dynamic")]
)
def test_unsupported_architectures_say_what(tmp_path, kind, overrides, what):
    save_tiny(kind, tmp_path / "m", **overrides)
    lm = omni_model.load(tmp_path / "m", fuse=False)
    with pytest.raises(UnsupportedExportError, match=what) as info:
        session(lm)
    assert "\n" not in str(info.value)
