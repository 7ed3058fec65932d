"""omni_model's logits processors in numpy, for engines whose process has no torch.

Same rules and order as omni_model.sampling (repetition penalty, temperature, top-k, top-p, min-p;
temperature 0 is greedy after the penalty); the tests hold each to its torch twin.
"""

from __future__ import annotations

import numpy as np

from omni_model.sampling_config import SamplingConfig


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    if penalty == 1.0 or seen.size == 0:
        return logits
    out = logits.copy()
    picked = out[seen]
    out[seen] = np.where(picked < 0, picked * penalty, picked / penalty)
    return out


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -k)[-k]
    return np.where(logits < kth, -np.inf, logits)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    if p >= 1.0:
        return logits
    order = np.argsort(logits, kind="stable")  # ascending, as omni_model and transformers sort
    cum = np.cumsum(_softmax(logits[order]))
    drop_sorted = cum <= 1 - p
    drop_sorted[-1] = False  # the most likely token always stays
    drop = np.empty_like(drop_sorted)
    drop[order] = drop_sorted
    return np.where(drop, -np.inf, logits)


def min_p_filter(logits: np.ndarray, min_p: float) -> np.ndarray:
    if min_p <= 0.0:
        return logits
    probs = _softmax(logits)
    drop = probs < min_p * probs.max()
    drop[probs.argmax()] = False
    return np.where(drop, -np.inf, logits)


def process_logits(logits: np.ndarray, config: SamplingConfig, seen: np.ndarray | None = None) -> np.ndarray:
    logits = logits.astype(np.float32, copy=False)
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, config.repetition_penalty)
    if config.greedy:
        return logits
    if config.temperature != 1.0:
        logits = logits / np.float32(config.temperature)
    logits = top_k_filter(logits, config.top_k)
    logits = top_p_filter(logits, config.top_p)
    return min_p_filter(logits, config.min_p)


def sample(logits: np.ndarray, config: SamplingConfig, rng: np.random.Generator | None = None,
           seen: np.ndarray | None = None) -> int:  # fmt: skip
    """The next token from logits (V,): argmax when greedy, else drawn from the processed distribution."""
    logits = process_logits(logits, config, seen)
    if config.greedy:
        return int(np.argmax(logits))
    probs = _softmax(logits.astype(np.float64))
    rng = rng if rng is not None else np.random.default_rng(config.seed)
    return int(rng.choice(probs.shape[0], p=probs))
