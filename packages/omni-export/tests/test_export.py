"""export_onnx end to end: quantized weights, GGUF blocks carried over exactly, the folder's
manifest, atomic replacement, and one-line errors."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from omni_model_tests import tiny, tiny_gguf

import omni_model
from omni_export.errors import ExportError, UnsupportedExportError
from omni_export.export import ExportConfig, export_onnx
from omni_export.weights import QuantLinear, quantized_weights
from omni_kernels.quant import dequantize
from omni_runtime import OrtEngine

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 4
Q = gguf.GGMLQuantizationType
# Every convertible type, mixed inside the fused q/k/v and gate/up projections as K-quant files mix them.
GGUF_TYPES = {"token_embd": Q.Q8_0, "output": Q.Q8_0, "attn_q": Q.Q4_1, "attn_k": Q.Q4_0, "attn_v": Q.Q4_1,
              "attn_output": Q.Q4_0, "ffn_gate": Q.Q4_1, "ffn_up": Q.Q4_1, "ffn_down": Q.Q4_0}  # fmt: skip


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory) -> Path:
    g = tiny_gguf
    rng = np.random.default_rng(0)
    dim, ffn, n_heads, n_kv, head = 64, 128, 4, 2, 16

    def randn(*shape):
        return rng.normal(0, 0.2, shape).astype(np.float32)

    tensors = {
        "token_embd.weight": randn(g.VOCAB, dim),
        "output_norm.weight": 1 + randn(dim),
        "output.weight": randn(g.VOCAB, dim),
    }
    for i in range(2):
        tensors |= {f"blk.{i}.attn_norm.weight": 1 + randn(dim), f"blk.{i}.ffn_norm.weight": 1 + randn(dim),
                    f"blk.{i}.attn_q.weight": randn(n_heads * head, dim), f"blk.{i}.attn_k.weight": randn(n_kv * head, dim),
                    f"blk.{i}.attn_v.weight": randn(n_kv * head, dim), f"blk.{i}.attn_output.weight": randn(dim, dim),
                    f"blk.{i}.ffn_gate.weight": randn(ffn, dim), f"blk.{i}.ffn_up.weight": randn(ffn, dim),
                    f"blk.{i}.ffn_down.weight": randn(dim, ffn)}  # fmt: skip
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return g.write_gguf(path, tensors, dim=dim, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv, ffn_dim=ffn,
                        context_length=128, types=GGUF_TYPES)  # fmt: skip


def _logits(folder: Path, ids: list[int]) -> np.ndarray:
    return OrtEngine(folder).forward(ids, last_only=False)


def test_gguf_blocks_carry_over_exactly(gguf_model, tmp_path):
    """With float32 compute (accuracy_level 1) the int4 graph equals the dequantized GGUF model."""
    m = export_onnx(gguf_model, tmp_path / "q", ExportConfig(weights="int4", accuracy_level=1, parity_prompt_tokens=16,
                                                             parity_decode_tokens=8), parity_text=TEXT)  # fmt: skip
    q = m["quantization"]
    assert q["tensors_converted_from_gguf"] == 2 * 7 + 2 and q["tensors_quantized_from_float"] == 0
    assert (
        m["parity"]["max_abs_logits_diff_prefill"] <= 1e-4
        and m["parity"]["max_abs_logits_diff_decode"] <= 1e-4
    )
    lm = omni_model.load(gguf_model, fuse=False)
    ids = list(range(40, 80))
    with torch.no_grad():
        ref = lm.model(torch.tensor([ids]))[0].numpy()
    assert np.abs(_logits(tmp_path / "q", ids) - ref).max() <= 1e-4
    fast = export_onnx(
        gguf_model, tmp_path / "q4", ExportConfig(weights="int4", parity_prompt_tokens=16), parity_text=TEXT
    )
    assert fast["parity"]["max_abs_logits_diff_prefill"] <= 0.5  # int8 activations: small, not zero


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_quantized_from_float_equals_the_dequantized_model(tmp_path, weights):
    """The graph computes exactly the model whose weights are the quantized ones (float32 compute);
    the quantization error itself is the weights', measured by perplexity elsewhere."""
    tiny.save_tiny("llama", tmp_path / "hf", intermediate_size=128)
    cfg = ExportConfig(
        weights=weights, accuracy_level=1, block_size=16, parity_prompt_tokens=16, parity_decode_tokens=4
    )
    m = export_onnx(tmp_path / "hf", tmp_path / "q", cfg, parity_text=TEXT)
    assert m["quantization"]["tensors_quantized_from_float"] == 2 * 7 + 2
    lm = omni_model.load(tmp_path / "hf", fuse=False)
    bits = 4 if weights == "int4" else 8
    ws = quantized_weights(lm.model.state_dict(), lm.config, None, bits, 16, False)
    deq = {k: torch.from_numpy(dequantize(w.packed)) if isinstance(w, QuantLinear) else torch.from_numpy(w)
           for k, w in ws.items()}  # fmt: skip
    lm.model.load_state_dict(deq)
    ids = list(range(40, 80))
    with torch.no_grad():
        ref = lm.model(torch.tensor([ids]))[0].numpy()
    assert np.abs(_logits(tmp_path / "q", ids) - ref).max() <= 1e-4


def test_export_replaces_an_export_but_nothing_else(tmp_path):
    tiny.save_tiny("llama", tmp_path / "hf")
    cfg = ExportConfig(weights="float32", parity_prompt_tokens=8, parity_decode_tokens=2)
    export_onnx(tmp_path / "hf", tmp_path / "out", cfg, parity_text=TEXT)
    export_onnx(tmp_path / "hf", tmp_path / "out", cfg, parity_text=TEXT)  # replaces the earlier export
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "out"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not an exported model"):
        export_onnx(tmp_path / "hf", tmp_path / "other", cfg, parity_text=TEXT)
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the temporary is gone


def test_bad_options_are_one_line_errors():
    for kwargs, what in [({"weights": "int3"}, "weights"), ({"block_size": 48}, "block_size"),
                         ({"accuracy_level": 7}, "accuracy_level")]:  # fmt: skip
        with pytest.raises(UnsupportedExportError, match=what) as info:
            ExportConfig(**kwargs)
        assert "\n" not in str(info.value)
