"""The decoder's inference form for CPUs: fused projections, folded gains, oneDNN linears.

Decoding one token reads every weight once and runs a few dozen small ops per layer, so on a CPU it
is bound by how fast the matmuls stream weights and by per-op overhead. `fuse_for_inference`
rewrites a loaded `Decoder` in place (an nn.Module -> nn.Module transform, applied from outside):
- q/k/v become one projection and gate/up another: fewer, larger matmuls;
- each RMSNorm gain is folded into the columns of the projection that reads it, and the attention
  scale into q's rows (or q_norm's gain), so those multiplications disappear;
- linears go through `omni_kernels.linear_f32` (in every block, latent-attention ones included): a native matrix-vector kernel for one decoded
  token and oneDNN for prompts; on the machine of BENCHMARKS.md they stream weights two to three
  times as fast as the BLAS behind `F.linear`.
Logits equal the plain decoder's within float32 rounding (tests hold them to 1e-4). The result is
for inference only: module names no longer match checkpoints, so train or export the plain form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omni_kernels import linear_f32 as linear
from omni_kv import KVCache
from omni_model.block import Block
from omni_model.decoder import Decoder
from omni_model.layers import MLP, Attention, attend
from omni_model.layers import Linear as PlainLinear
from omni_model.rope import apply_rope


class Linear(nn.Module):
    """A bias-optional linear layer that runs through `linear`; can share its weight (tied heads)."""

    def __init__(self, weight: Tensor | nn.Parameter, bias: Tensor | None = None) -> None:
        super().__init__()
        self.weight = (
            weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        )
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


class FusedBlock(nn.Module):
    """A Block with fused q/k/v and gate/up projections and its norm gains folded into them."""

    def __init__(self, block: Block) -> None:
        super().__init__()
        a, mlp = block.self_attn, block.mlp
        self.layer, self.n_heads, self.n_kv_heads, self.head_dim = (
            a.layer,
            a.n_heads,
            a.n_kv_heads,
            a.head_dim,
        )
        self.eps_attn, self.eps_mlp = block.input_layernorm.eps, block.post_attention_layernorm.eps
        g_attn, g_mlp = block.input_layernorm.weight, block.post_attention_layernorm.weight
        q_w, q_b = a.q_proj.weight, a.q_proj.bias
        self.q_norm, self.k_norm = a.q_norm, a.k_norm
        if self.q_norm is not None:  # Qwen3: the scale goes into q_norm's gain (RoPE is linear)
            self.q_norm.weight.data.mul_(a.scale)
        else:
            q_w, q_b = q_w * a.scale, None if q_b is None else q_b * a.scale
        w = torch.cat([q_w, a.k_proj.weight, a.v_proj.weight]).mul_(g_attn)  # (H+2Hkv)*Dh rows, D columns
        b = None if q_b is None else torch.cat([q_b, a.k_proj.bias, a.v_proj.bias])
        self.qkv_proj = Linear(w, b)
        self.o_proj = Linear(a.o_proj.weight.data)
        if isinstance(mlp, MLP):
            self.moe, self.moe_norm = None, None
            self.gate_up_proj = Linear(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).mul_(g_mlp))
            self.down_proj = Linear(mlp.down_proj.weight.data)
        else:  # an MoE layer runs as it is, behind its own (unfolded) norm gain
            self.moe, self.moe_norm = mlp, block.post_attention_layernorm

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None, mask: Tensor | None
    ) -> Tensor:
        b, t, d = x.shape
        h, hkv, dh = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.qkv_proj(F.rms_norm(x, (d,), None, self.eps_attn))
        qkv = qkv.view(b, t, h + 2 * hkv, dh).transpose(1, 2)  # (B, H+2Hkv, T, Dh)
        v = qkv[:, h + hkv :]
        if self.q_norm is not None and self.k_norm is not None:
            q = apply_rope(self.q_norm(qkv[:, :h]), cos, sin)
            k = apply_rope(self.k_norm(qkv[:, h : h + hkv]), cos, sin)
        else:
            qk = apply_rope(qkv[:, : h + hkv], cos, sin)  # q and k rotated in one pass
            q, k = qk[:, :h], qk[:, h:]
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, Hkv, S, Dh)
            k, v = k.to(q.dtype), v.to(q.dtype)  # a float16 cache under a float32 model
        x = x + self.o_proj(attend(q, k, v, mask, 1.0).transpose(1, 2).reshape(b, t, h * dh))
        if self.moe is not None and self.moe_norm is not None:
            return x + self.moe(self.moe_norm(x))
        gate, up = self.gate_up_proj(F.rms_norm(x, (d,), None, self.eps_mlp)).chunk(2, dim=-1)
        return x + self.down_proj(F.silu(gate) * up)


@torch.no_grad()
def fuse_for_inference(model: Decoder) -> Decoder:
    """Rewrite `model` into its CPU inference form (in place); returns it, in eval mode."""
    for i, block in enumerate(model.layers):
        if isinstance(block, Block) and isinstance(block.self_attn, Attention):
            model.layers[i] = FusedBlock(block)
    # Other blocks (latent attention, MTP modules) keep their structure; their linears get the kernels.
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, PlainLinear):
                setattr(parent, name, Linear(child.weight, child.bias))
    if isinstance(model.lm_head, nn.Linear):
        model.lm_head = Linear(model.lm_head.weight, model.lm_head.bias)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
