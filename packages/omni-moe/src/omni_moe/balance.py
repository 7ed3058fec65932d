"""Load balancing: the Switch / Mixtral auxiliary loss, router z-loss, and DeepSeek-V3's
auxiliary-loss-free bias update (arXiv 2408.15664): nudge a selection-only bias toward balance
instead of adding a loss term that fights the language-modelling gradient.
"""

import torch
from torch import Tensor


def switch_loss(logits: Tensor, indices: Tensor) -> Tensor:
    """E * sum_e f_e * P_e, f_e = assignments to e per token, P_e = mean softmax prob (Mixtral's)."""
    n, e = logits.shape  # (N, E)
    probs = logits.float().softmax(dim=-1)  # (N, E)
    f = torch.bincount(indices.reshape(-1), minlength=e).to(probs.dtype) / n  # (E,), sums to K
    return e * torch.sum(f * probs.mean(dim=0))


def z_loss(logits: Tensor) -> Tensor:
    """Router z-loss (ST-MoE): mean squared logsumexp, keeps logits small for bf16 stability."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


@torch.no_grad()
def update_bias(bias: Tensor, counts: Tensor, rate: float) -> Tensor:
    """In place: bias_e += rate * sign(mean load - load_e); over-loaded experts go down."""
    load = counts.to(bias.dtype)
    bias.add_(rate * torch.sign(load.mean() - load))
    return bias
