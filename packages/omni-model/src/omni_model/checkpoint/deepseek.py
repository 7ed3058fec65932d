"""DeepSeek-V3 Hugging Face folders (DeepseekV3ForCausalLM): latent attention, sigmoid-routed MoE
with shared experts and a dense prefix, and the multi-token prediction modules.

Three things differ from the Llama family beyond the config:
- the softmax scale of latent attention is qk_head_dim^-0.5, times YaRN's mscale(factor,
  mscale_all_dim) squared when the RoPE is scaled;
- with `rope_interleave` (the default) the rotary dims of q and of the shared key come out of their
  projections as interleaved pairs (x0, x1), (x2, x3), ...; permuting those rows of the weights
  to the half-split layout once at load gives the same attention scores with our one rotary kernel;
- the MTP modules are stored as extra decoder layers `layers.{N+k}` (N = num_hidden_layers), with
  `enorm`, `hnorm`, `eh_proj`, `shared_head.norm` and copies of the embedding and output head, which
  the model already has and which are dropped.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from omni_model.checkpoint.fields import positive, short
from omni_model.config import MLAConfig, RopeConfig
from omni_model.errors import ConfigError
from omni_moe import MoEConfig, MoEConfigError


def mla_from_hf(hf: dict[str, Any]) -> MLAConfig:
    nope, rope = positive(hf, "qk_nope_head_dim"), positive(hf, "qk_rope_head_dim")
    kv_rank = hf.get("kv_lora_rank")
    if not isinstance(kv_rank, int) or isinstance(kv_rank, bool) or kv_rank <= 0:
        raise ConfigError(f"kv_lora_rank must be a positive integer, got {short(kv_rank)}")
    declared = hf.get("qk_head_dim")
    if declared is not None and declared != nope + rope:
        raise ConfigError(
            f"qk_head_dim ({short(declared)}) must equal qk_nope_head_dim + qk_rope_head_dim ({nope} + {rope})"
        )
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim != rope:
        raise ConfigError(f"head_dim ({short(head_dim)}) must equal qk_rope_head_dim ({rope})")
    try:
        return MLAConfig(
            kv_lora_rank=kv_rank,
            qk_nope_head_dim=nope,
            qk_rope_head_dim=rope,
            v_head_dim=positive(hf, "v_head_dim"),
            q_lora_rank=positive(hf, "q_lora_rank", default=None),
        )
    except ConfigError as e:
        raise ConfigError(str(e).removeprefix("mla.")) from None


def softmax_scale(mla: MLAConfig, rope: RopeConfig) -> float:
    scale = mla.qk_head_dim**-0.5
    if rope.type != "default" and rope.mscale_all_dim:
        m = 0.1 * rope.mscale_all_dim * math.log(rope.factor) + 1.0 if rope.factor > 1 else 1.0
        scale *= m * m
    return scale


def moe_from_hf(hf: dict[str, Any]) -> MoEConfig:
    n_shared = hf.get("n_shared_experts") or 0
    if not isinstance(n_shared, int) or isinstance(n_shared, bool) or n_shared < 0:
        raise ConfigError(f"n_shared_experts must be a non-negative integer, got {short(n_shared)}")
    dense = hf.get("first_k_dense_replace") or 0
    if not isinstance(dense, int) or isinstance(dense, bool) or dense < 0:
        raise ConfigError(f"first_k_dense_replace must be a non-negative integer, got {short(dense)}")
    try:
        return MoEConfig(
            n_experts=positive(hf, "n_routed_experts"),
            top_k=positive(hf, "num_experts_per_tok"),
            expert_dim=positive(hf, "moe_intermediate_size"),
            router="sigmoid",
            norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
            n_group=positive(hf, "n_group", default=None) or 1,
            topk_group=positive(hf, "topk_group", default=None) or 1,
            routed_scaling_factor=positive(hf, "routed_scaling_factor", float, 1.0),
            score_correction_bias=True,
            n_shared_experts=n_shared,
            first_k_dense_replace=dense,
        )
    except MoEConfigError as e:
        raise ConfigError(str(e)) from None


def mtp_depth_declared(hf: dict[str, Any]) -> int:
    depth = hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers", 0)) or 0
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
        raise ConfigError(f"num_nextn_predict_layers must be a non-negative integer, got {short(depth)}")
    return depth


_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_DROPPED = ("embed_tokens.weight", "shared_head.head.weight")


def mtp_layers_present(state: dict[str, torch.Tensor], n_layers: int, declared: int) -> int:
    """How many of the declared MTP modules the weights hold (0 or all: a partial set is an error
    the loader reports as missing tensors)."""
    present = {int(m.group(1)) for name in state if (m := _LAYER.match(name))}
    return declared if any(n_layers + k in present for k in range(declared)) else 0


def convert_weights(
    state: dict[str, torch.Tensor],
    n_layers: int,
    mtp_depth: int,
    mla: MLAConfig,
    n_heads: int,
    interleaved: bool,
) -> dict[str, torch.Tensor]:
    """Rename MTP layers to `mtp.{k}.*` (dropping their embedding/head copies) and move interleaved
    rotary rows to the half-split layout; MoE expert stacking is done by the caller afterwards."""
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        m = _LAYER.match(name)
        if m and int(m.group(1)) >= n_layers:
            k, rest = int(m.group(1)) - n_layers, m.group(2)
            if k >= mtp_depth or rest in _DROPPED:
                continue  # modules beyond those kept, and the shared embedding / head copies
            name = f"mtp.{k}.{rest.replace('shared_head.norm.', 'norm.')}"
        if interleaved:
            t = _deinterleave(name, t, mla, n_heads)
        out[name] = t
    return out


def _deinterleave(name: str, t: torch.Tensor, mla: MLAConfig, n_heads: int) -> torch.Tensor:
    """Rows (x0, x1, x2, x3, ...) of each rotary block -> (x0, x2, ..., x1, x3, ...)."""
    rope = mla.qk_rope_head_dim
    perm = torch.cat([torch.arange(0, rope, 2), torch.arange(1, rope, 2)])
    if name.endswith(("self_attn.q_proj.weight", "self_attn.q_b_proj.weight")):
        if t.ndim != 2 or t.shape[0] != n_heads * mla.qk_head_dim:
            return t  # a misshapen tensor: the loader's shape check names it
        heads = t.reshape(n_heads, mla.qk_head_dim, -1)
        rows = torch.cat([heads[:, : mla.qk_nope_head_dim], heads[:, mla.qk_nope_head_dim :][:, perm]], dim=1)
        return rows.reshape_as(t)
    if name.endswith(("self_attn.kv_a_proj_with_mqa.weight", "self_attn.kv_a_proj_with_mqa.bias")):
        if t.shape[0] != mla.kv_lora_rank + rope:
            return t
        return torch.cat([t[: mla.kv_lora_rank], t[mla.kv_lora_rank :][perm]])
    return t
