"""Decoder layers: RMSNorm, grouped-query attention with RoPE and the SwiGLU MLP.

Attribute names follow Hugging Face checkpoints (`q_proj`, `gate_proj`, `input_layernorm`, ...) so
safetensors load without a rename table. Attention goes through `scaled_dot_product_attention`; one
decoded token attends with its query heads folded onto the kv heads instead of repeating k and v.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omni_kv import KVCache
from omni_model.config import ModelConfig
from omni_model.rope import apply_rope


class Linear(nn.Linear):
    """nn.Linear with storage allocated but not initialised: `Decoder.init_weights` or a checkpoint
    fills it. Loading a checkpoint then never touches (nor makes resident) a throwaway random init."""

    def reset_parameters(self) -> None:
        pass


class Embedding(nn.Embedding):
    """nn.Embedding, uninitialised like `Linear`."""

    def reset_parameters(self) -> None:
        pass


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """Attention of q (B, H, T, Dh) over k (B, Hkv, S, Dh), v (B, Hkv, S, Dv); mask (T, S) bool or None
    (causal)."""
    b, h, t, dh = q.shape
    n_kv = k.shape[1]
    if t == 1 and mask is None:
        # One new token. SDPA's CPU kernels cost milliseconds here (they are tiled for long
        # sequences); two small matmuls cost microseconds. The g query heads sharing a kv head are
        # folded into one matrix, so each cached k/v is read once, not from g repeated copies.
        qg = q.view(b, n_kv, h // n_kv, dh)  # (B, Hkv, G, Dh)
        scores = torch.matmul(qg, k.transpose(2, 3))  # (B, Hkv, G, S)
        if scale != 1.0:
            scores = scores * scale
        return torch.matmul(scores.softmax(dim=-1), v).view(b, h, 1, v.shape[-1])
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=h != n_kv
    )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer, self.n_heads, self.n_kv_heads, self.head_dim = (
            layer,
            cfg.n_heads,
            cfg.n_kv_heads,
            cfg.head_size,
        )
        self.window = cfg.window_of(layer)
        self.scale = cfg.attention_scale or self.head_dim**-0.5
        d, dh = cfg.dim, self.head_dim
        self.q_proj = Linear(d, cfg.n_heads * dh, bias=cfg.qkv_bias)
        self.k_proj = Linear(d, cfg.n_kv_heads * dh, bias=cfg.qkv_bias)
        self.v_proj = Linear(d, cfg.n_kv_heads * dh, bias=cfg.qkv_bias)
        self.o_proj = Linear(cfg.n_heads * dh, d, bias=False)
        self.q_norm = RMSNorm(dh, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(dh, cfg.norm_eps) if cfg.qk_norm else None

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None, mask: Tensor | None
    ) -> Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim)  # (B, T, H, Dh)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|Hkv, T, Dh)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, Hkv, S, Dh)
            k, v = k.to(q.dtype), v.to(q.dtype)  # a float16 cache under a float32 model
        return self.o_proj(attend(q, k, v, mask, self.scale).transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = Linear(dim, hidden, bias=False)
        self.up_proj = Linear(dim, hidden, bias=False)
        self.down_proj = Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
