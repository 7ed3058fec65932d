"""SwiGLU experts stored as stacked 3D parameters, laid out as transformers >= 5 stores them.

`gate_up_proj` (E, 2I, D) holds each expert's gate rows then up rows, `down_proj` (E, D, I); so a
transformers MoE block's `experts.*` loads without renames, and per-expert checkpoints
(`experts.{i}.gate_proj`, Mixtral's `w1/w3/w2`) are stacked by omni_moe.hf. `forward_group` runs
evenly spaced experts as one batched matmul over a strided view of the stack: no weight is copied.
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

    def forward_group(self, lo: int, step: int, n: int, x: Tensor) -> Tensor:
        """Run experts lo, lo+step, ... (n of them) on x (n, C, D), C rows each -> (n, C, D)."""
        pick = slice(lo, lo + (n - 1) * step + 1, step)  # a strided view of the stack: no weight is copied
        gate, up = torch.bmm(x, self.gate_up_proj[pick].transpose(1, 2)).chunk(2, dim=-1)  # (n, C, I)
        # In place when no gradient is wanted: two fewer (n, C, I) tensors to allocate and write.
        act = F.silu(gate) * up if gate.requires_grad else F.silu(gate, inplace=True).mul_(up)
        return torch.bmm(act, self.down_proj[pick].transpose(1, 2))


class SwiGLU(nn.Module):
    """Dense SwiGLU MLP, used for the shared experts (HF names gate_proj / up_proj / down_proj)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
