"""kNN-LM: the mix is a distribution, lambda 0 is the model, and a datastore holding the text makes
the text far more predictable."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from omni_model_tests import tiny

import omni_model
from omni_retrieval import IndexConfig, RetrievalError
from omni_retrieval.knnlm import KNNLM, KNNConfig, build_datastore


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    tiny.save_tiny("llama", folder)
    return omni_model.load(folder, fuse=False).model


def nll(log_p: torch.Tensor, targets: torch.Tensor) -> float:
    return float(-log_p[torch.arange(targets.numel()), targets].mean())


def test_knn_mixture(model, tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, tiny.VOCAB, 300).tolist() for _ in range(3)]
    m = build_datastore(model, docs, tmp_path / "ds", IndexConfig(kind="flat", metric="l2"), context=128)
    assert m["count"] == 3 * 299 and m["metric"] == "l2"
    ids = torch.tensor(docs[1][:129])  # the datastore's first window of this document, and its next token
    with torch.inference_mode():
        h = model.hidden_states(ids[None, :-1])[0]
        logits = model.logits(h[None])[0]
        targets = ids[1:]
        plain = KNNLM(tmp_path / "ds", KNNConfig(lam=0.0), vocab_size=tiny.VOCAB, dim=model.config.dim)
        assert torch.allclose(plain.mix(logits, h), logits.log_softmax(-1), atol=1e-5)
        knn = KNNLM(tmp_path / "ds", KNNConfig(k=8, lam=0.5, temperature=1.0), vocab_size=tiny.VOCAB,
                    dim=model.config.dim)  # fmt: skip
        mixed = knn.mix(logits, h)
    assert torch.allclose(mixed.exp().sum(-1), torch.ones(len(targets)), atol=1e-4)
    # The datastore holds this very text: each position's nearest key is itself (distance 0), keyed to
    # the right token, so p >= lambda * (most of p_knn): perplexity near 1 / lambda, not about VOCAB.
    assert math.exp(nll(mixed, targets)) < 2.5 < math.exp(nll(logits.log_softmax(-1), targets)) / 50


def test_datastore_checks(model, tmp_path):
    build_datastore(model, [list(range(300))], tmp_path / "ds", IndexConfig(kind="flat", metric="l2"))
    with pytest.raises(RetrievalError, match="this model has 999 and"):
        KNNLM(tmp_path / "ds", vocab_size=999, dim=model.config.dim)
    with pytest.raises(RetrievalError, match="L2 distance"):
        build_datastore(model, [list(range(300))], tmp_path / "x", IndexConfig(kind="flat"))
    with pytest.raises(RetrievalError, match="lambda"):
        KNNConfig(lam=2.0)
    (tmp_path / "ds" / "values.npy").write_bytes(b"junk")
    with pytest.raises(RetrievalError, match="not readable"):
        KNNLM(tmp_path / "ds", vocab_size=tiny.VOCAB, dim=model.config.dim)


def test_settings_parse_and_refuse_in_one_line():
    assert KNNConfig.parse("k=64, lambda=0.1,temperature=120") == KNNConfig(k=64, lam=0.1, temperature=120.0)
    assert KNNConfig.parse("") == KNNConfig()
    for bad, msg in (
        ("k=0", "k >= 1"),
        ("beta=1", "expected k=N"),
        ("k=x", "not an integer"),
        ("lambda", "expected"),
    ):
        with pytest.raises(RetrievalError, match=msg):
            KNNConfig.parse(bad)
