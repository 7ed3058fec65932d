"""The speculative-decoding benchmark suite end to end in its quick form (the tiny model, seconds of
training for the heads and the draft)."""

from __future__ import annotations

import pytest

from press_play.bench_speculative import SpecBenchConfig, render_spec_section, run_spec_bench


@pytest.mark.slow
def test_quick_run_measures_and_renders(tiny_model_dir, tmp_path):
    config = SpecBenchConfig.quick_config(
        model=str(tiny_model_dir), threads=1, work_dir=str(tmp_path), play="hamlet"
    )
    rep = run_spec_bench(config)
    assert list(rep.modes) == [
        "plain",
        "plain, one-row steps",
        "prompt lookup",
        "heads (2)",
        "draft (1 layers)",
    ]
    for name, figs in rep.modes.items():
        assert figs["peak_rss_mb"] > 0
        for set_name in ("open-ended", "editing"):
            f = figs[set_name]
            assert f["tok_s"] > 0 and f["tokens"] > 0 and f["one_row_ratio"] > 0, (name, set_name)
            assert f["identical"] or name == "plain, one-row steps", (
                name,
                set_name,
            )  # exact engine: bit for bit
            assert name.startswith("plain") or f["tokens_per_step"] >= 1.0
    text = render_spec_section(rep)
    assert text.startswith("<!-- bench:speculative:start -->") and "QUICK" in text and "Targets" in text
