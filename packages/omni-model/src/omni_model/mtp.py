"""Multi-token prediction (MTP) modules, as DeepSeek-V3 trains and ships them.

Module k (k = 1..D) predicts token i+k+1 at position i from two inputs: the hidden state of
position i one level down (the main model's final-normed state for k = 1, module k-1's output
after that) and the embedding of token i+k. Each is RMS-normalised, the two are concatenated and
projected back to the model width, one decoder block runs over the sequence (causally, with
rotary positions i+k), a norm follows, and the model's own output head gives the logits. With the
main head, D modules propose D+1 tokens per forward: the drafts of self-speculative decoding.

A module is a `Block` (MoE when the model has MoE layers, as in DeepSeek-V3) plus `enorm`,
`hnorm`, `eh_proj` and the closing `norm`, the checkpoint's `shared_head.norm`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from omni_model.block import Block
from omni_model.config import ModelConfig
from omni_model.layers import Linear, RMSNorm


class MTPModule(Block):
    def __init__(self, cfg: ModelConfig, depth: int) -> None:
        super().__init__(cfg, cfg.n_layers + depth, moe=cfg.moe is not None)
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.eh_proj = Linear(2 * cfg.dim, cfg.dim, bias=False)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def predict(self, h: Tensor, emb: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """h: states of positions i (B, T, D); emb: embeddings of tokens i+k (B, T, D) -> normed (B, T, D)."""
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1))
        return self.norm(self.forward(x, cos, sin, None, None))
