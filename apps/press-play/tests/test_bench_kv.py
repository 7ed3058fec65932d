"""The KV cache benchmark suite end to end in its quick form."""

from __future__ import annotations

import pytest

from press_play.bench_kv import KVBenchConfig, render_kv_section, run_kv_bench


@pytest.mark.slow
def test_quick_run_measures_and_renders():
    rep = run_kv_bench(KVBenchConfig.quick_config())
    assert set(rep.ppl) == {
        "dense",
        "dense:dtype=float16",
        "int8",
        "kivi",
        "nf4",
        "int8 calibrated",
        "nf4 calibrated",
    }
    assert abs(rep.ppl["int8"] / rep.ppl["dense"] - 1) < 0.05
    assert set(rep.long_ppl) == {"dense", "sink", "window"}
    assert all(r > 0 for rates in rep.decode_tok_s.values() for r in rates)
    paged, dense = rep.memory["paged"], rep.memory["dense"]
    assert paged["resident_mb"] <= paged["budget_mb"] and paged["page_faults"] > 0
    text = render_kv_section(rep)
    assert text.startswith("<!-- bench:kv:start -->") and text.rstrip().endswith("<!-- bench:kv:end -->")
    assert dense["peak_mb"] > 0
