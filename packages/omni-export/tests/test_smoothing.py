"""Activation smoothing for the 8da4w ExecuTorch weights: the float model is unchanged, a GGUF's 4-bit
blocks stay exact (only their scales and minimums move), and the int8 activations lose less."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omni_model_tests import tiny_gguf

import omni_model
from omni_export.errors import ExportError
from omni_export.executorch import BlockSums, ExecuTorchConfig, quantize_8da4w
from omni_export.smoothing import smooth

Q = gguf.GGMLQuantizationType
TYPES = {"token_embd": Q.Q8_0, "output": Q.Q8_0, "attn_q": Q.Q4_1, "attn_k": Q.Q4_0, "attn_v": Q.Q4_1,
         "attn_output": Q.Q4_0, "ffn_gate": Q.Q4_1, "ffn_up": Q.Q4_1, "ffn_down": Q.Q4_0}  # fmt: skip
DIM, FFN, HEADS, KV = 64, 128, 2, 1  # head size 32: o_proj's blocks lie inside a head


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory):
    """A 2-layer GGUF whose norms give two input channels 20x the rest, as trained models' do (both in the
    first block of 32: a block's factor is set by its largest channel)."""
    rng = np.random.default_rng(0)

    def randn(*shape):
        return rng.normal(0, 0.2, shape).astype(np.float32)

    def norm():
        w = 1 + randn(DIM)
        w[[3, 17]] *= 20
        return w

    g = tiny_gguf
    tensors = {"token_embd.weight": randn(g.VOCAB, DIM), "output_norm.weight": norm()}
    for i in range(2):
        tensors |= {f"blk.{i}.attn_norm.weight": norm(), f"blk.{i}.ffn_norm.weight": norm(),
                    f"blk.{i}.attn_q.weight": randn(DIM, DIM), f"blk.{i}.attn_k.weight": randn(DIM // HEADS, DIM),
                    f"blk.{i}.attn_v.weight": randn(DIM // HEADS, DIM), f"blk.{i}.attn_output.weight": randn(DIM, DIM),
                    f"blk.{i}.ffn_gate.weight": randn(FFN, DIM), f"blk.{i}.ffn_up.weight": randn(FFN, DIM),
                    f"blk.{i}.ffn_down.weight": randn(DIM, FFN)}  # fmt: skip
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return g.write_gguf(path, tensors, dim=DIM, n_layers=2, n_heads=HEADS, n_kv_heads=KV, ffn_dim=FFN,
                        context_length=128, types=TYPES)  # fmt: skip


def _load(path):
    return omni_model.load(path, fuse=False).model.eval().requires_grad_(False)


def _ids(n: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, 256, n)]


def test_the_float_model_computes_the_same(gguf_model):
    model, plain = _load(gguf_model), _load(gguf_model)
    factors = smooth(model, _ids(256, 1), 0.5, 32)
    x = torch.tensor([_ids(48, 2)])
    want, got = plain(x), model(x)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    cols = torch.cat([c for c, _ in factors.values() if c is not None])
    assert cols.min() >= 1 and cols.max() > 2  # the outlier channels' blocks shrink
    assert {"layers.0.self_attn.o_proj", "layers.1.mlp.down_proj"} <= set(factors)
    assert factors["layers.0.mlp.up_proj"][1].shape == (FFN,)  # up's rows carry down's divisors
    assert factors["layers.0.self_attn.v_proj"][1].shape == (DIM // HEADS,)
    assert torch.equal(
        model.embed_tokens.weight, plain.embed_tokens.weight
    )  # the head is untied, not the table
    assert not torch.equal(model.lm_head.weight, plain.lm_head.weight)


def test_gguf_blocks_stay_exact(gguf_model):
    """Each 4-bit linear taken from the GGUF equals the smoothed float weight: codes untouched, scales
    and minimums multiplied by the factors."""
    model, smoothed = _load(gguf_model), _load(gguf_model)
    factors = smooth(smoothed, _ids(256, 1), 0.5, 32)
    smooth(model, _ids(256, 1), 0.5, 32)
    how: dict[str, str] = {}
    quantize_8da4w(model, gguf_model, 32, lambda name, kind: how.setdefault(name, kind), factors)
    assert sum(kind.startswith("4-bit, converted") for kind in how.values()) == 14
    for name, linear in smoothed.named_modules():
        if name.startswith("layers.") and isinstance(linear, torch.nn.Linear):
            q = model.get_submodule(name)
            w = (q.linear if isinstance(q, BlockSums) else q).weight.dequantize()
            if isinstance(q, BlockSums):
                w = w + q.consts.repeat_interleave(32, dim=1)
            assert torch.allclose(w, linear.weight, rtol=1e-5, atol=1e-6), name


def _activation_kl(model, ids) -> float:
    """KL from the model with float activations to the same weights with int8 ones: what the
    activations' quantization alone costs."""
    with torch.inference_mode():
        q = F.log_softmax(model(ids).float(), -1)
        weights = [
            m.weight
            for m in model.modules()
            if hasattr(getattr(m, "weight", None), "activation_quantization")
        ]
        modes = [w.activation_quantization for w in weights]
        for w in weights:
            w.activation_quantization = None
        p = F.log_softmax(model(ids).float(), -1)
        for w, mode in zip(weights, modes, strict=True):
            w.activation_quantization = mode
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_int8_activations_lose_less(gguf_model):
    ids = torch.tensor([_ids(96, 3)])
    rough = _load(gguf_model)
    quantize_8da4w(rough, gguf_model, 32, lambda name, kind: None)
    smoothed = _load(gguf_model)
    factors = smooth(smoothed, _ids(256, 1), 0.5, 32)
    quantize_8da4w(smoothed, gguf_model, 32, lambda name, kind: None, factors)
    assert _activation_kl(smoothed, ids) < 0.7 * _activation_kl(rough, ids)  # measured: 0.48x


def test_bad_settings_are_refused(gguf_model):
    with pytest.raises(ExportError, match="alpha"):
        smooth(_load(gguf_model), _ids(64, 1), 1.5, 32)
    with pytest.raises(ExportError, match="at least 2"):
        smooth(_load(gguf_model), [1], 0.5, 32)
    with pytest.raises(ExportError, match="must divide"):
        smooth(_load(gguf_model), _ids(64, 1), 0.5, 48)
    with pytest.raises(ExportError, match="smoothing"):
        ExecuTorchConfig(smoothing=-0.1)
