"""Upcycle a loaded dense decoder into a mixture of experts (omni_moe.upcycle_ffn on every FFN).

The model's outputs are unchanged at initialisation ("copy" or "split"); its config gains the MoE
settings, so caches, checkpoints and later training see an MoE model. Works on the plain form
(`load(source, fuse=False)`): the fused inference form has no separate FFN weights to split.
"""

from __future__ import annotations

import dataclasses

from omni_model.block import Block
from omni_model.decoder import Decoder
from omni_model.errors import ConfigError
from omni_model.layers import MLP
from omni_moe import MoEConfigError, upcycle_config, upcycle_ffn


def upcycle(model: Decoder, *, n_experts: int, top_k: int, method: str = "copy") -> Decoder:
    """Turn every dense FFN of `model` into an MoE layer (in place); returns the model."""
    if any(not isinstance(b, Block) for b in model.layers):
        raise ConfigError("upcycle needs the plain decoder: load it with omni_model.load(source, fuse=False)")
    try:
        moe_cfg = upcycle_config(model.config.ffn_dim, n_experts, top_k, method)  # type: ignore[arg-type]
        for block in model.layers:
            if isinstance(block.mlp, MLP):
                m = block.mlp
                block.mlp = upcycle_ffn(m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight,
                                        n_experts, top_k, method)  # type: ignore[arg-type]  # fmt: skip
    except MoEConfigError as e:
        raise ConfigError(f"upcycle: {e}") from None
    model.config = dataclasses.replace(model.config, moe=moe_cfg)
    return model
