"""Sparse upcycling: a dense SwiGLU FFN becomes an MoE layer whose output equals it at initialisation.

Two ways (Komatsuzaki et al. 2022 for "copy"; the "split" partition follows MoEfication, Zhang et
al. 2022): "copy" replicates the FFN into every expert and zeroes the router, so the softmax is
uniform and the k renormalised weights average k identical outputs; "split" partitions the FFN's
hidden units across the experts (a SwiGLU is a sum over its hidden units), with every expert active
and weighted 1, so the experts' outputs add up to the dense one. Training then lets them diverge.
"""

from typing import Literal

import torch
from torch import Tensor

from omni_moe.config import MoEConfig, MoEConfigError
from omni_moe.layer import MoELayer

Method = Literal["copy", "split"]


def upcycle_config(ffn_dim: int, n_experts: int, top_k: int, method: Method) -> MoEConfig:
    """The MoEConfig an upcycled FFN of hidden size `ffn_dim` gets."""
    if method == "copy":
        return MoEConfig(n_experts=n_experts, top_k=top_k, expert_dim=ffn_dim, norm_topk_prob=True)
    if method == "split":
        if ffn_dim % n_experts:
            raise MoEConfigError(
                f"split: the FFN's {ffn_dim} hidden units do not divide into {n_experts} experts"
            )
        if top_k != n_experts:
            raise MoEConfigError(
                f"split starts with every expert active: top_k ({top_k}) must equal n_experts"
            )
        # Uniform softmax weights 1/E, scaled back to 1 per expert.
        return MoEConfig(n_experts=n_experts, top_k=top_k, expert_dim=ffn_dim // n_experts,
                         norm_topk_prob=False, routed_scaling_factor=float(n_experts))  # fmt: skip
    raise MoEConfigError(f"method must be 'copy' or 'split', got {method!r}")


@torch.no_grad()
def upcycle_ffn(
    gate: Tensor, up: Tensor, down: Tensor, n_experts: int, top_k: int, method: Method
) -> MoELayer:
    """An MoELayer equal to the SwiGLU FFN down(silu(gate x) * up x); gate/up (F, D), down (D, F)."""
    f, d = gate.shape
    if up.shape != (f, d) or down.shape != (d, f):
        raise MoEConfigError(f"FFN weights do not fit: gate {tuple(gate.shape)}, up {tuple(up.shape)}, "
                             f"down {tuple(down.shape)}")  # fmt: skip
    cfg = upcycle_config(f, n_experts, top_k, method)
    layer = MoELayer(d, cfg).to(gate.dtype)
    layer.gate.weight.zero_()  # uniform routing at first
    i = cfg.expert_dim
    if method == "copy":
        gate_up = torch.cat([gate, up]).expand(n_experts, 2 * f, d)  # (E, 2F, D)
        downs = down.expand(n_experts, d, f)  # (E, D, F)
    else:
        gate_up = torch.stack(
            [torch.cat([gate[e * i : (e + 1) * i], up[e * i : (e + 1) * i]]) for e in range(n_experts)]
        )
        downs = torch.stack([down[:, e * i : (e + 1) * i] for e in range(n_experts)])  # (E, D, I)
    layer.experts.gate_up_proj.copy_(gate_up)
    layer.experts.down_proj.copy_(downs)
    return layer
