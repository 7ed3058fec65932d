"""The numpy logits processors equal omni_model's torch ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omni_model import sampling as ref
from omni_model.sampling_config import SamplingConfig
from omni_runtime import sampling


@pytest.fixture
def logits() -> np.ndarray:
    x = np.random.default_rng(0).standard_normal(500).astype(np.float32) * 3
    x[7] = x[9]  # a tie
    return x


def same(a: np.ndarray, b: torch.Tensor) -> bool:
    b = b.numpy()
    return bool(
        np.array_equal(np.isinf(a), np.isinf(b))
        and np.allclose(a[np.isfinite(a)], b[np.isfinite(b)], rtol=1e-6)
    )


@pytest.mark.parametrize("k", [0, 1, 5, 499, 500])
def test_top_k(logits, k):
    assert same(sampling.top_k_filter(logits, k), ref.top_k_filter(torch.from_numpy(logits), k))


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 1.0])
def test_top_p(logits, p):
    assert same(sampling.top_p_filter(logits, p), ref.top_p_filter(torch.from_numpy(logits), p))


@pytest.mark.parametrize("m", [0.0, 0.05, 0.5, 1.0])
def test_min_p(logits, m):
    assert same(sampling.min_p_filter(logits, m), ref.min_p_filter(torch.from_numpy(logits), m))


def test_repetition_penalty_and_full_chain(logits):
    seen = np.array([3, 3, 7, 100, 499])
    cfg = SamplingConfig(temperature=0.7, top_k=50, top_p=0.9, min_p=0.02, repetition_penalty=1.3)
    got = sampling.process_logits(logits, cfg, seen)
    want = ref.process_logits(torch.from_numpy(logits), cfg, torch.from_numpy(seen))
    assert same(got, want)
    greedy = SamplingConfig(repetition_penalty=1.3)
    assert sampling.sample(logits, greedy, seen=seen) == int(
        ref.sample(torch.from_numpy(logits), greedy, seen_ids=torch.from_numpy(seen))
    )


def test_seeded_sampling_is_reproducible_and_follows_the_distribution(logits):
    cfg = SamplingConfig(temperature=1.0, seed=3)
    rng = np.random.default_rng(3)
    draws = [sampling.sample(logits[:4], cfg, rng) for _ in range(4000)]
    probs = np.exp(logits[:4] - logits[:4].max())
    probs /= probs.sum()
    freq = np.bincount(draws, minlength=4) / len(draws)
    assert np.abs(freq - probs).max() < 0.03
    assert [sampling.sample(logits, cfg, np.random.default_rng(5)) for _ in range(3)] == [
        sampling.sample(logits, cfg, np.random.default_rng(5)) for _ in range(3)
    ]
