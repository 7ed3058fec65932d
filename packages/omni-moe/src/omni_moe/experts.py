"""SwiGLU experts stored as stacked 3D parameters, laid out as transformers >= 5 stores them.

`gate_up_proj` (E, 2I, D) holds each expert's gate rows then up rows, `down_proj` (E, D, I); so a
transformers MoE block's `experts.*` loads without renames, and per-expert checkpoints
(`experts.{i}.gate_proj`, Mixtral's `w1/w3/w2`) are stacked by omni_moe.hf.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Experts(nn.Module):
    def __init__(self, n_experts: int, dim: int, expert_dim: int) -> None:
        super().__init__()
        self.n_experts = n_experts
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * expert_dim, dim))  # (E, 2I, D)
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, expert_dim))  # (E, D, I)
        nn.init.normal_(self.gate_up_proj, std=0.02)
        nn.init.normal_(self.down_proj, std=0.02)

    def expert_forward(self, e: int, x: Tensor) -> Tensor:
        """Run expert e on its tokens x (n, D) -> (n, D)."""
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)  # (n, I) each
        return F.linear(F.silu(gate) * up, self.down_proj[e])


class SwiGLU(nn.Module):
    """Dense SwiGLU MLP, used for the shared experts (HF names gate_proj / up_proj / down_proj)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
