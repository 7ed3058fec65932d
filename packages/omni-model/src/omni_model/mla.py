"""Multi-head Latent Attention (DeepSeek-V2/V3), with a naive and an absorbed execution path.

Keys and values are not projected from the token directly: the token is first compressed to a
latent c (`kv_lora_rank` values, RMS-normalised), and each head's key (no-position part) and value
are up-projections of c by `kv_b_proj`. Position enters through a separate rotary part: a rotary
query per head and one rotary key shared by all heads, both `qk_rope_head_dim` wide. So the cache
needs only c and the rotary key per token (omni_kv.LatentKVCache).

Two paths give the same outputs (tests hold them to 1e-5):
- naive: expand every cached latent to full keys and values, then attend as usual. Cheapest for a
  prompt, where each latent is expanded once and used by many queries.
- absorbed: fold the key up-projection into the query (q_nope @ W_uk is a query in latent space)
  and the value up-projection into the output, so attention runs directly over the cached latents,
  all heads sharing them as in multi-query attention. Decoding then reads rank + rope values per
  cached token instead of expanding all of them again at every step.
`mode` picks one ("naive", "absorbed") or lets the length decide ("auto": absorbed for up to
ABSORB_MAX_NEW new tokens, such as decoding or verifying a few draft tokens).
Parameter names follow the checkpoints (`q_a_proj`, `kv_a_proj_with_mqa`, `kv_b_proj`, ...).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from omni_kv import KVCache, LatentKVCache
from omni_model.config import ModelConfig
from omni_model.layers import Linear, RMSNorm, attend
from omni_model.rope import apply_rope

Mode = Literal["auto", "naive", "absorbed"]
ABSORB_MAX_NEW = 16
LATENT_NORM_EPS = 1e-6  # the latent norms use a fixed epsilon in DeepSeek's code and in transformers


class MLAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        m = cfg.mla
        assert m is not None  # Block builds this only for MLA configs
        self.layer, self.n_heads, self.scale = layer, cfg.n_heads, cfg.softmax_scale
        self.nope, self.rope_dim, self.v_dim, self.rank = (
            m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim, m.kv_lora_rank,
        )  # fmt: skip
        self.mode: Mode = "auto"
        d, h = cfg.dim, cfg.n_heads
        self.q_proj: Linear | None = None
        self.q_a_proj: Linear | None = None
        self.q_a_layernorm: RMSNorm | None = None
        self.q_b_proj: Linear | None = None
        if m.q_lora_rank is None:
            self.q_proj = Linear(d, h * m.qk_head_dim, bias=False)
        else:
            self.q_a_proj = Linear(d, m.q_lora_rank, bias=cfg.qkv_bias)
            self.q_a_layernorm = RMSNorm(m.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = Linear(m.q_lora_rank, h * m.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(d, self.rank + self.rope_dim, bias=cfg.qkv_bias)
        self.kv_a_layernorm = RMSNorm(self.rank, LATENT_NORM_EPS)
        self.kv_b_proj = Linear(self.rank, h * (self.nope + self.v_dim), bias=False)
        self.o_proj = Linear(h * self.v_dim, d, bias=cfg.qkv_bias)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None, mask: Tensor | None
    ) -> Tensor:
        b, t, _ = x.shape
        if self.q_proj is not None:
            q = self.q_proj(x)
        else:
            assert self.q_a_proj is not None and self.q_a_layernorm is not None and self.q_b_proj is not None
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(b, t, self.n_heads, self.nope + self.rope_dim).transpose(1, 2)  # (B, H, T, nope+rope)
        q_nope, q_rope = q.split([self.nope, self.rope_dim], dim=-1)
        q_rope = apply_rope(q_rope, cos, sin)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)[:, None]  # (B, 1, T, rank)
        k_rope = apply_rope(k_rope[:, None], cos, sin)  # (B, 1, T, rope)
        joint = None
        if cache is not None:
            latent, k_rope = cache.update(self.layer, latent, k_rope)  # (B, 1, S, rank), (B, 1, S, rope)
            if isinstance(cache, LatentKVCache):
                joint = cache.joint(self.layer, latent.shape[2])
        absorbed = self.mode == "absorbed" or (self.mode == "auto" and t <= ABSORB_MAX_NEW)
        if absorbed:
            if joint is None:
                joint = torch.cat([latent, k_rope], dim=-1)[:, 0]
            out = self._absorbed(q_nope, q_rope, joint, mask)
        else:
            out = self._naive(q_nope, q_rope, latent, k_rope, mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.v_dim))

    def _naive(
        self, q_nope: Tensor, q_rope: Tensor, latent: Tensor, k_rope: Tensor, mask: Tensor | None
    ) -> Tensor:
        """Expand the latents to per-head keys and values and attend over them: (B, H, T, v)."""
        b, h, _, _ = q_nope.shape
        s = latent.shape[2]
        kv = self.kv_b_proj(latent[:, 0]).view(b, s, h, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)  # (B, H, S, nope), (B, H, S, v)
        k = torch.cat([k_nope, k_rope.expand(b, h, s, self.rope_dim)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        return attend(q, k, v, mask, self.scale)

    def _absorbed(self, q_nope: Tensor, q_rope: Tensor, joint: Tensor, mask: Tensor | None) -> Tensor:
        """Attend in latent space over joint (B, S, rank + rope): (B, H, T, v)."""
        b, h, t, _ = q_nope.shape
        s = joint.shape[1]
        w = self.kv_b_proj.weight.view(h, self.nope + self.v_dim, self.rank)
        w_uk, w_uv = w[:, : self.nope], w[:, self.nope :]  # (H, nope, rank), (H, v, rank)
        q_latent = torch.matmul(q_nope, w_uk)  # (B, H, T, rank): the key up-projection, absorbed
        # All heads share the latents: one (H*T, rank+rope) x (rank+rope, S) product reads them once.
        q_joint = torch.cat([q_latent, q_rope], dim=-1).reshape(b, h * t, self.rank + self.rope_dim)
        scores = torch.bmm(q_joint, joint.transpose(1, 2)).view(b, h, t, s) * self.scale
        if mask is None and t > 1:  # causal, the new tokens being the last t of s
            mask = torch.ones(t, s, dtype=torch.bool, device=scores.device).tril(s - t)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.softmax(dim=-1).view(b, h * t, s)
        out_latent = torch.bmm(probs, joint[..., : self.rank]).view(b, h, t, self.rank)
        return torch.matmul(out_latent, w_uv.transpose(1, 2))  # the value up-projection: (B, H, T, v)
