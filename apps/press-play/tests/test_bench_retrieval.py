"""The retrieval benchmark suite end to end in its quick form (the tiny model on a few plays), its
hidden-state cache, and its question set against the corpus."""

from __future__ import annotations

import json
import re
import tomllib

import numpy as np
import pytest

from press_play.bench_retrieval import (
    QA_FILE,
    RetrievalBenchConfig,
    play_states,
    plays,
    render_retrieval_section,
    run_retrieval_bench,
)


@pytest.mark.slow
def test_quick_run_measures_and_renders(tiny_model_dir, tmp_path):
    config = RetrievalBenchConfig.quick_config(model=str(tiny_model_dir), cache_dir=str(tmp_path))
    rep = run_retrieval_bench(config)
    assert [(r["kind"], r["compression"], r["nprobe"]) for r in rep.indices] == [
        ("pq", 16, None), ("ivfpq", 16, config.nprobe), ("ivfpq", 16, 32)]  # fmt: skip
    for r in rep.indices:
        assert 0 < r["recall"] <= 1 and r["recall"] == r["peer_recall"]  # the same codes, searched two ways
        assert r["resident_bytes"] <= r["head_bytes"] + r["budget_bytes"] < r["index_bytes"] + r["head_bytes"]
        assert r["p99_ms"] >= r["p50_ms"] > 0
    k = rep.knn
    assert k["datastore_tokens"] == rep.tokens["datastore"] > 0 and set(k["plays"]) == set(config.held_out)
    assert k["ppl_lm"] > 1 and k["ppl_knn"] > 1 and k["index_s"] > 0
    assert rep.rag["questions"] == 2 and len(rep.rag["rows"]) == 2
    text = render_retrieval_section(rep)
    assert text.startswith("<!-- bench:retrieval:start -->") and "QUICK" in text


def test_hidden_states_are_cached_and_checked(tiny_model_dir, tmp_path):
    import omni_model

    lm = omni_model.load(tiny_model_dir)
    text = tmp_path / "play.txt"
    text.write_text("To be, or not to be, that is the question. " * 20, encoding="utf-8")
    keys, values = play_states(lm, "play", text, 32, None, tmp_path / "cache")
    assert keys.shape == (len(values), lm.config.dim) and values.dtype == np.int32
    cached = sorted((tmp_path / "cache").rglob("*.keys.npy"))
    assert len(cached) == 1
    again, _ = play_states(lm, "play", text, 32, None, tmp_path / "cache")
    assert np.array_equal(keys, again)
    np.save(cached[0], np.zeros_like(np.load(cached[0])))  # altered: not trusted, computed again
    fresh, _ = play_states(lm, "play", text, 32, None, tmp_path / "cache")
    assert np.array_equal(keys, fresh)
    assert json.loads(cached[0].with_suffix("").with_suffix(".json").read_text())["tokens"] == len(values)


@pytest.mark.slow
def test_every_answer_is_stated_in_its_play():
    qa = tomllib.loads(QA_FILE.read_text(encoding="utf-8"))["qa"]
    texts = plays()
    assert len(qa) >= 25
    for q in qa:
        body = texts[q["play"]].read_text(encoding="utf-8")
        assert any(re.search(rf"\b{re.escape(a)}\b", body, re.IGNORECASE) for a in q["answers"]), q
