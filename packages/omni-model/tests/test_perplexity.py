"""Windowed perplexity against a direct cross-entropy computation on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from omni_model.config import ModelConfig
from omni_model.decoder import Decoder
from omni_model.errors import ConfigError, DataError
from omni_model.perplexity import perplexity

V = 61


@pytest.fixture(scope="module")
def model() -> Decoder:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=64)
    return Decoder(cfg).eval()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, V, (203,), generator=torch.Generator().manual_seed(1))


def _direct(model, ids, context):
    """Each window on its own: mean over all scored tokens of -log p(token | window prefix)."""
    total, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids), context):
            w = ids[s : s + context]
            if len(w) < 2:
                continue
            logp = F.log_softmax(model(w[None])[0].double(), dim=-1)
            total -= logp[:-1].gather(-1, w[1:, None]).sum().item()
            n += len(w) - 1
    return total, n


@pytest.mark.parametrize("context", [2, 16, 50, 64])
def test_matches_direct_cross_entropy(model, ids, context):
    res = perplexity(model, ids, context)
    nll, n = _direct(model, ids, context)
    assert res.n_scored == n and res.context == context
    assert res.n_windows == math.ceil(len(ids) / context) - (len(ids) % context == 1)
    assert res.nll_sum == pytest.approx(nll, rel=1e-5)
    assert res.ppl == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_windows_do_not_overlap(model, ids):
    # 200 tokens in windows of 50: 4 windows of 49 scored tokens each.
    res = perplexity(model, ids.tolist(), 50, max_tokens=200)
    assert (res.n_windows, res.n_scored) == (4, 196)
    # A window's scores do not depend on the windows before it.
    nll_last = perplexity(model, ids[150:200], 50).nll_sum
    nll_first3 = perplexity(model, ids[:150], 50).nll_sum
    assert res.nll_sum == pytest.approx(nll_first3 + nll_last, rel=1e-6)


def test_reports_progress_per_window(model, ids):
    calls: list[tuple[int, int]] = []
    perplexity(model, ids, 64, on_progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_random_model_is_near_uniform(model, ids):
    # An untrained model should be within a factor of ~2 of the uniform perplexity V.
    assert V / 2 < perplexity(model, ids, 64).ppl < V * 2


@pytest.mark.parametrize(("kwargs", "field"), [({"context": 1}, "context"), ({"context": 65}, "max_seq_len"),
                                               ({"context": 16, "max_tokens": 1}, "max_tokens")])  # fmt: skip
def test_bad_arguments_name_the_field(model, ids, kwargs, field):
    with pytest.raises(ConfigError, match=field):
        perplexity(model, ids, **kwargs)


def test_too_short_text_is_an_error(model):
    with pytest.raises(DataError, match="at least 2"):
        perplexity(model, [5], 16)
