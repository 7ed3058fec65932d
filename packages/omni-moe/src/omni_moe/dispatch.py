"""Sparse dispatch: group (token, slot) pairs by expert and run only the experts that got tokens.

Sorting the flat expert indices makes each expert's tokens one contiguous slice, so the cost is one
matmul chain per non-empty expert plus one index_add_ back, never a dense run-every-expert-and-mask.
The per-expert counts cross to the host (`tolist`) to size the slices: one sync per layer.
"""

import torch
from torch import Tensor

from omni_moe.experts import Experts


def dispatch(x: Tensor, weights: Tensor, indices: Tensor, experts: Experts) -> tuple[Tensor, Tensor]:
    """x (N, D), weights/indices (N, K) -> weighted sum of expert outputs (N, D), counts (E,)."""
    k = indices.shape[1]
    flat = indices.reshape(-1)  # (N*K,)
    order = flat.argsort(stable=True)  # (N*K,) slots grouped by expert
    tokens = order // k  # (N*K,) which token each sorted slot belongs to
    slot_w = weights.reshape(-1)[order]  # (N*K,)
    counts = torch.bincount(flat, minlength=experts.n_experts)  # (E,)
    out = torch.zeros_like(x)
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n == 0:
            continue
        tok = tokens[start : start + n]  # (n,)
        y = experts.expert_forward(e, x[tok]) * slot_w[start : start + n, None].to(x.dtype)  # (n, D)
        out.index_add_(0, tok, y)
        start += n
    return out, counts
