"""The decoder block: pre-norm attention (grouped-query or latent) and a dense or MoE feed-forward."""

from __future__ import annotations

from torch import Tensor, nn

from omni_kv import KVCache
from omni_model.config import ModelConfig
from omni_model.layers import MLP, Attention, RMSNorm
from omni_model.mla import MLAttention
from omni_moe import MoELayer


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, moe: bool | None = None) -> None:
        """Decoder block `layer`; `moe` overrides the config's dense/MoE rule (MTP blocks are MoE)."""
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn: nn.Module = Attention(cfg, layer) if cfg.mla is None else MLAttention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        moe = cfg.is_moe_layer(layer) if moe is None else moe
        self.mlp: nn.Module = (
            MoELayer(cfg.dim, cfg.moe) if cfg.moe is not None and moe else MLP(cfg.dim, cfg.ffn_dim)
        )

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None, mask: Tensor | None
    ) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, mask)  # (B, T, D)
        return x + self.mlp(self.post_attention_layernorm(x))
