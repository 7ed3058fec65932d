"""Upcycled decoders equal the dense ones at initialisation: a tiny Llama, and SmolLM2 (slow)."""

from __future__ import annotations

import pytest
import torch

import omni_model
from omni_model import ConfigError
from omni_model.corpus import text_path
from omni_model.upcycle import upcycle
from omni_moe import MoELayer

from .tiny import VOCAB, save_tiny


@pytest.mark.parametrize(("method", "n_experts", "top_k"), [("copy", 4, 2), ("split", 4, 4), ("split", 3, 3)])
def test_tiny_upcycle_keeps_logits(tmp_path, method, n_experts, top_k):
    save_tiny("llama", tmp_path, intermediate_size=96)
    dense = omni_model.load(tmp_path, fuse=False).model
    moe = upcycle(
        omni_model.load(tmp_path, fuse=False).model, n_experts=n_experts, top_k=top_k, method=method
    )
    assert moe.config.moe is not None and moe.config.moe.n_experts == n_experts
    assert all(isinstance(b.mlp, MoELayer) for b in moe.layers)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        err = (moe(ids) - dense(ids)).abs().max().item()
    assert err <= 1e-4, f"{method}: {err:.2e}"


def test_upcycle_errors_name_the_problem(tmp_path):
    save_tiny("llama", tmp_path, intermediate_size=96)
    with pytest.raises(ConfigError, match="fuse=False"):
        upcycle(omni_model.load(tmp_path).model, n_experts=4, top_k=2)
    plain = omni_model.load(tmp_path, fuse=False).model
    with pytest.raises(ConfigError, match="top_k"):
        upcycle(plain, n_experts=4, top_k=2, method="split")
    with pytest.raises(ConfigError, match="do not divide"):
        upcycle(plain, n_experts=5, top_k=5, method="split")
    with pytest.raises(ConfigError, match="top_k"):
        upcycle(plain, n_experts=4, top_k=9, method="copy")


@pytest.mark.slow
@pytest.mark.parametrize(("method", "n_experts", "top_k"), [("copy", 4, 2), ("split", 4, 4)])
def test_smollm2_upcycle_keeps_logits(method, n_experts, top_k):
    lm = omni_model.load("smollm2-135m-instruct", fuse=False)
    dense = lm.model
    ids = torch.tensor([lm.tokenizer.encode(text_path("hamlet").read_text(encoding="utf-8")[:2000])[:256]])
    with torch.no_grad():
        expected = dense(ids)
        got = upcycle(dense, n_experts=n_experts, top_k=top_k, method=method)(ids)
    err = (got - expected).abs().max().item()
    assert err <= 1e-4, f"{method}: max |logits difference| {err:.2e}"
