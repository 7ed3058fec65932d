"""The train benchmark suite end to end in its quick form (the tiny model, seconds of training)."""

from __future__ import annotations

import pytest

from press_play.bench_train import TrainBenchConfig, render_train_section, run_train_bench


@pytest.mark.slow
def test_quick_run_measures_and_renders(tiny_model_dir):
    config = TrainBenchConfig.quick_config(model=str(tiny_model_dir), threads=1)
    rep = run_train_bench(config)
    lo, h = rep.lora, rep.heads
    assert lo["steps"] >= 1 and set(lo["before"]) == set(lo["after"]) == {"macbeth"}
    assert lo["before"]["macbeth"] != lo["after"]["macbeth"]  # the adapters trained and are applied
    assert h["steps"] >= 1 and all(0 <= h["text"][f"head{k}_acc"] <= 1 for k in (1, 2, 3))
    text = render_train_section(rep)
    assert text.startswith("<!-- bench:train:start -->") and "QUICK" in text and "| 3 | t+4 |" in text


@pytest.mark.slow
def test_quick_distill_run_measures_and_renders(tiny_model_dir, tmp_path):
    from press_play.bench_train import DistillBenchConfig, render_distill_section, run_distill_bench

    config = DistillBenchConfig.quick_config(model=str(tiny_model_dir), threads=1, cache_dir=str(tmp_path))
    rep = run_distill_bench(config)
    assert set(rep.runs) == {"distill", "scratch"} and all(r["steps"] >= 1 for r in rep.runs.values())
    assert rep.cache["windows"] >= 1 and rep.cache["bytes"] > 0
    assert all(p["all"] > 1 for p in rep.ppl.values()) and set(rep.ppl) == {"teacher", "distill", "scratch"}
    text = render_distill_section(rep)
    assert text.startswith("<!-- bench:train-distill:start -->") and "QUICK" in text and "distilled" in text
