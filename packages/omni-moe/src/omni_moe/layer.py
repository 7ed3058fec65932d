"""MoELayer: router + sparse routed experts + optional (gated) shared experts.

Attribute names follow the checkpoints: `gate` (router, with `e_score_correction_bias`), `experts`
(stacked SwiGLU), `shared_experts` (DeepSeek-V3's name; Qwen2-MoE's `shared_expert` is renamed by
omni_moe.hf) and `shared_expert_gate`. Router logits are returned by `forward_aux` for the losses,
not kept on the module; only the per-expert counts of the last call are kept, for logging.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omni_moe.config import MoEConfig
from omni_moe.dispatch import dispatch
from omni_moe.experts import Experts, SwiGLU
from omni_moe.router import Router


@dataclass(frozen=True)
class MoEOutput:
    out: Tensor  # (B, T, D)
    logits: Tensor  # (B*T, E) router logits, for z-loss and the switch loss
    indices: Tensor  # (B*T, K) chosen experts
    counts: Tensor  # (E,) tokens per expert


class MoELayer(nn.Module):
    def __init__(self, dim: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.gate = Router(dim, cfg)
        self.experts = Experts(cfg.n_experts, dim, cfg.expert_dim)
        self.shared_experts = SwiGLU(dim, cfg.shared_dim) if cfg.n_shared_experts else None
        self.shared_expert_gate = nn.Linear(dim, 1, bias=False) if cfg.shared_expert_gate else None
        self.register_buffer("last_counts", torch.zeros(cfg.n_experts, dtype=torch.long), persistent=False)

    def forward_aux(self, x: Tensor) -> MoEOutput:
        """Forward that also returns what the balance losses and the bias update need."""
        b, t, d = x.shape
        flat = x.reshape(b * t, d)  # (N, D)
        weights, indices, logits = self.gate(flat)  # (N, K), (N, K), (N, E)
        out, counts = dispatch(flat, weights, indices, self.experts)
        if self.shared_experts is not None:
            shared = self.shared_experts(flat)  # (N, D)
            if self.shared_expert_gate is not None:
                shared = F.sigmoid(self.shared_expert_gate(flat)) * shared
            out = out + shared
        self.last_counts.copy_(counts)
        return MoEOutput(out.reshape(b, t, d), logits, indices, counts)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_aux(x).out
