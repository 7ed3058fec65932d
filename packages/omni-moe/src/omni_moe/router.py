"""Token-to-expert routers: softmax top-k (Mixtral, Qwen2/3-MoE) and sigmoid (DeepSeek-V3).

Selection and weighting are separate on purpose: DeepSeek-V3 chooses experts by score + correction
bias (and optionally within the best groups) but weights them by the unbiased score, and Sinkhorn
balancing (training only, as in Megatron's S-BASE routing) likewise changes which experts are
chosen, never how much they count. Mixtral's "top-k of logits, then softmax" equals "softmax, top-k,
renormalise", so one softmax path with `norm_topk_prob` covers Mixtral and Qwen.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omni_moe.config import MoEConfig


def sinkhorn(logits: Tensor, n_iters: int) -> Tensor:
    """Balanced assignment scores: rows (tokens) sum to ~1, columns (experts) to N/E."""
    n, e = logits.shape  # (N, E)
    log_p = logits.float()
    for _ in range(n_iters):
        log_p = log_p - torch.logsumexp(log_p, dim=1, keepdim=True)
        log_p = log_p - torch.logsumexp(log_p, dim=0, keepdim=True) + math.log(n / e)
    return log_p.exp()


def group_mask(choice: Tensor, n_group: int, topk_group: int) -> Tensor:
    """Keep only the topk_group groups whose two best choice scores sum highest; -inf elsewhere."""
    n, e = choice.shape
    grouped = choice.view(n, n_group, e // n_group)  # (N, G, E/G)
    group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (N, G)
    keep_idx = group_scores.topk(topk_group, dim=-1, sorted=False).indices  # (N, topk_group)
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep_idx, True)
    keep = keep.unsqueeze(-1).expand_as(grouped).reshape(n, e)  # (N, E)
    return choice.masked_fill(~keep, float("-inf"))


def route(
    logits: Tensor, cfg: MoEConfig, bias: Tensor | None = None, balance: bool = False
) -> tuple[Tensor, Tensor]:
    """Weights (N, K) and expert indices (N, K) from router logits (N, E)."""
    logits = logits.float()  # routing decisions in fp32, as every reference does
    scores = logits.softmax(dim=-1) if cfg.router == "softmax" else logits.sigmoid()  # (N, E)
    choice = scores if bias is None else scores + bias
    if balance and cfg.sinkhorn_iters > 0:
        choice = sinkhorn(logits, cfg.sinkhorn_iters)
    if cfg.n_group > 1:
        choice = group_mask(choice, cfg.n_group, cfg.topk_group)
    indices = choice.topk(cfg.top_k, dim=-1, sorted=False).indices  # (N, K)
    weights = scores.gather(1, indices)  # (N, K)
    if cfg.norm_topk_prob:
        # The 1e-20 is DeepSeek-V3's: sigmoid scores can all underflow toward 0.
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * cfg.routed_scaling_factor, indices


class Router(nn.Module):
    """The `gate` of an MoE block: a bias-free linear to E logits, plus the selection bias buffer."""

    def __init__(self, dim: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_experts, dim))  # (E, D), HF's `gate.weight`
        nn.init.normal_(self.weight, std=0.02)
        if cfg.score_correction_bias:
            # A buffer, not a parameter: it is moved by update_bias, never by the optimiser.
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_experts))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (N, D) -> weights (N, K), indices (N, K), logits (N, E) for the balance losses."""
        logits = F.linear(x.float(), self.weight.float())  # (N, E)
        weights, indices = route(logits, self.cfg, self.e_score_correction_bias, balance=self.training)
        return weights, indices, logits
