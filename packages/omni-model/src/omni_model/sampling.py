"""Sampling: the settings of one generation and the logits processors that apply them.

Each processor is a pure function on logits of shape (V,) or (B, V) and matches the transformers
LogitsProcessor / LogitsWarper of the same name (the tests check this). They apply in transformers'
order: repetition penalty, temperature, top-k, top-p, min-p. Temperature 0 means greedy: argmax after
the repetition penalty, the filters being moot.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from omni_model.sampling_config import SamplingConfig

__all__ = ["SamplingConfig", "apply_repetition_penalty", "apply_temperature", "make_generator", "min_p_filter",
           "process_logits", "sample", "top_k_filter", "top_p_filter"]  # fmt: skip


def apply_repetition_penalty(logits: Tensor, token_ids: Tensor, penalty: float) -> Tensor:
    """Divide positive and multiply negative logits of the tokens in `token_ids` ((N,) or (B, N))."""
    if penalty == 1.0 or token_ids.numel() == 0:
        return logits
    flat = logits.dim() == 1
    scores, ids = (logits[None], token_ids.reshape(1, -1)) if flat else (logits, token_ids)
    picked = scores.gather(-1, ids)  # (B, N); repeated ids read and write the same value
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    out = scores.scatter(-1, ids, picked)
    return out[0] if flat else out


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """Scale logits by 1/temperature (temperature > 0)."""
    return logits if temperature == 1.0 else logits / temperature


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the k highest logits (and any tied with the k-th); -inf elsewhere. k = 0 is off."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, -math.inf)


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (nucleus sampling)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1)  # ascending, as transformers does, for equal ties
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cum <= 1 - p
    drop_sorted[..., -1] = False  # the most likely token always stays
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, -math.inf)


def min_p_filter(logits: Tensor, min_p: float) -> Tensor:
    """Drop tokens whose probability is below min_p times the top token's probability."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.amax(dim=-1, keepdim=True)
    drop = probs < threshold
    # The top token stays even when rounding puts it under its own threshold (min_p = 1).
    drop.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)
    return logits.masked_fill(drop, -math.inf)


def process_logits(logits: Tensor, config: SamplingConfig, seen_ids: Tensor | None = None) -> Tensor:
    """Apply every processor of `config` in transformers' order; greedy stops after the penalty."""
    if seen_ids is not None:
        logits = apply_repetition_penalty(logits, seen_ids, config.repetition_penalty)
    if config.greedy:
        return logits
    logits = apply_temperature(logits, config.temperature)
    logits = top_k_filter(logits, config.top_k)
    logits = top_p_filter(logits, config.top_p)
    return min_p_filter(logits, config.min_p)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from `seed`, or from fresh entropy when seed is None."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def sample(logits: Tensor, config: SamplingConfig, generator: torch.Generator | None = None,
           seen_ids: Tensor | None = None) -> Tensor:  # fmt: skip
    """Next token ids: (V,) -> () or (B, V) -> (B,), greedy or drawn from the processed distribution."""
    logits = process_logits(logits, config, seen_ids)
    if config.greedy:
        return logits.argmax(dim=-1)
    probs = logits.float().softmax(dim=-1)
    flat = probs.dim() == 1
    drawn = torch.multinomial(probs[None] if flat else probs, 1, generator=generator)  # (B, 1)
    return drawn[0, 0] if flat else drawn[:, 0]
