"""An int8 KV cache at the graph's inputs and outputs: codes and float16 scales per token, coded as
omni_kv's int8 cache codes them; logits within 1e-3 of the PyTorch decoder running that cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omni_model_tests import tiny

import omni_model
from omni_export.errors import UnsupportedExportError
from omni_export.export import ExportConfig, export_onnx
from omni_export.onnx_decoder import GraphOptions, build_decoder_graph
from omni_export.session import OnnxDecoder
from omni_kv import CacheSpec
from omni_runtime.ort_engine import OrtEngine

CASES = {"llama": ("llama", {}), "qwen2-bias": ("qwen2", {}), "qwen3-qk-norm": ("qwen3", {"head_dim": 32}),
         "llama-yarn": ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                   "original_max_position_embeddings": 32}})}  # fmt: skip
TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 4


def torch_int8(lm, ids: np.ndarray, prefill: int) -> np.ndarray:
    cache = lm.model.make_cache(spec=CacheSpec("int8"))
    with torch.no_grad():
        out = [lm.model(torch.from_numpy(ids[:, :prefill]), cache=cache)]
        out += [
            lm.model(torch.from_numpy(ids[:, t : t + 1]), cache=cache) for t in range(prefill, ids.shape[1])
        ]
    return torch.cat(out, dim=1).numpy()


@pytest.mark.parametrize("name", sorted(CASES))
def test_graph_matches_the_pytorch_int8_cache(tmp_path, name):
    kind, overrides = CASES[name]
    tiny.save_tiny(kind, tmp_path, **overrides)
    lm = omni_model.load(tmp_path, fuse=False)
    weights = {k: v.detach().float().numpy() for k, v in lm.model.state_dict().items()}
    graph = build_decoder_graph(lm.config, weights, GraphOptions(max_seq_len=128, kv="int8"))
    (tmp_path / "g.onnx").write_bytes(graph.SerializeToString())
    session = OnnxDecoder(tmp_path / "g.onnx", lm.config, kv="int8")
    ids = np.random.default_rng(0).integers(0, tiny.VOCAB, (1, 40))
    got = [session.step(ids[:, :24])] + [session.step(ids[:, t : t + 1]) for t in range(24, 40)]
    err = np.abs(np.concatenate(got, axis=1) - torch_int8(lm, ids, 24)).max()
    assert err <= 1e-3, f"{name}: {err:.2e}"
    assert session.past[0]["key"].dtype == np.uint8 and session.past[0]["key_scale"].dtype == np.float16


def test_export_and_engine_with_int8_kv(tmp_path):
    tiny.save_tiny("llama", tmp_path / "hf", intermediate_size=128)
    m = export_onnx(tmp_path / "hf", tmp_path / "q", ExportConfig(weights="float32", kv="int8", parity_prompt_tokens=16,
                                                                   parity_decode_tokens=8), parity_text=TEXT)  # fmt: skip
    assert (
        m["kv"]["dtype"] == "int8" and m["kv"]["bytes_per_token"] < m["config"]["n_layers"] * 2 * 2 * 16 * 4
    )
    assert m["parity"]["greedy_tokens_agreeing"] == 9 and "int8 cache" in m["parity"]["reference"]
    assert (
        m["parity"]["max_abs_logits_diff_decode"] <= 1e-3
        and m["parity"]["max_abs_logits_diff_prefill"] <= 1e-3
    )
    lm = omni_model.load(tmp_path / "hf", fuse=False)
    engine = OrtEngine(tmp_path / "q")
    ids = list(range(40, 80))
    full = engine.forward(ids[:30], last_only=False)
    steps = [engine.forward([t])[0] for t in ids[30:]]
    # The runtime's buffers hold what the parity decoder's growing arrays hold: same logits.
    ref = OnnxDecoder(tmp_path / "q" / "model.onnx", lm.config, kv="int8")
    want = [ref.step(np.array([ids[:30]]))[0]] + [ref.step(np.array([[t]]))[0, -1] for t in ids[30:]]
    assert np.abs(full - want[0]).max() <= 1e-5
    assert max(np.abs(a - b).max() for a, b in zip(steps, want[1:], strict=True)) <= 1e-5
    engine.reset()  # again with a last-only prefill: the reused binding must take any token count
    assert np.abs(engine.forward(ids[:30])[0] - want[0][-1]).max() <= 1e-5
    assert np.abs(engine.forward(ids[30:32])[0] - want[2]).max() <= 1e-5
    for t in ids[32:]:
        engine.forward([t])
    engine.rollback(5)
    again = [engine.forward([t])[0] for t in ids[35:]]
    assert max(np.abs(a - b).max() for a, b in zip(again, want[6:], strict=True)) <= 1e-5


def test_int8_kv_refuses_sliding_windows(tmp_path):
    tiny.save_tiny("mistral", tmp_path, sliding_window=7)
    with pytest.raises(UnsupportedExportError, match="int8 KV cache is not supported with sliding-window"):
        export_onnx(tmp_path, tmp_path / "out", ExportConfig(weights="float32", kv="int8"), parity_text=TEXT)
    with pytest.raises(UnsupportedExportError, match="float32 or int8"):
        ExportConfig(kv="int4")


def test_calibrated_keys_match_the_calibrated_pytorch_cache(tmp_path):
    from omni_kv.calibration import calibrate

    tiny.save_tiny("llama", tmp_path / "hf")
    lm = omni_model.load(tmp_path / "hf", fuse=False)
    cal = calibrate(lm.model, list(range(200)), "tiny", context=64).save(tmp_path / "cal.json")
    cfg = ExportConfig(weights="float32", kv="int8", kv_calibration=str(cal), parity_prompt_tokens=16,
                       parity_decode_tokens=8)  # fmt: skip
    m = export_onnx(tmp_path / "hf", tmp_path / "q", cfg, parity_text=TEXT)
    assert (
        m["kv"]["calibration"] == "kv-calibration.json" and (tmp_path / "q" / "kv-calibration.json").is_file()
    )
    assert m["parity"]["max_abs_logits_diff_decode"] <= 1e-3 and m["parity"]["greedy_tokens_agreeing"] == 9
    export_onnx(tmp_path / "hf", tmp_path / "p", ExportConfig(weights="float32", kv="int8",
                        parity_prompt_tokens=16, parity_decode_tokens=8), parity_text=TEXT)  # fmt: skip
    ids = list(range(40, 90))
    a, b = (
        OrtEngine(tmp_path / "q").forward(ids, last_only=False),
        OrtEngine(tmp_path / "p").forward(ids, False),
    )
    assert np.abs(a - b).max() > 0  # the scales change what is coded
    with pytest.raises(UnsupportedExportError, match="applies to an int8 KV cache"):
        ExportConfig(kv_calibration=str(cal))
