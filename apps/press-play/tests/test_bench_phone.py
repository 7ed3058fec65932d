"""The phone benchmark suite end to end in its quick form, on a tiny model (no peer environment)."""

from __future__ import annotations

import math

import pytest
from omni_model_tests import tiny

from press_play.bench_phone import (
    ET_FLOAT,
    ET_INT4,
    ONNX,
    PhoneBenchConfig,
    PhoneReport,
    prepare,
    render_phone_section,
    run_phone_bench,
)


@pytest.mark.slow
def test_quick_run_measures_and_renders(tmp_path):
    tiny.save_tiny("llama", tmp_path / "hf")
    config = PhoneBenchConfig.quick_config(model=str(tmp_path / "hf"), work_dir=str(tmp_path / "work"))
    report = run_phone_bench(config)
    assert list(report.engines) == [ET_INT4, ET_FLOAT, ONNX]
    for e in report.engines.values():
        run = e["runs"][0]
        assert all(
            run[k] > 0 and math.isfinite(run[k])
            for k in ("decode_tok_s_short", "prefill_tok_s", "peak_rss_mb")
        )
    assert report.identity["identical"]  # the float32 program decodes as PyTorch does
    assert abs(report.engines[ET_FLOAT]["ppl"] / report.float32_ppl - 1) < 1e-4
    assert report.coreml["int4_tensors"] > 0
    text = render_phone_section(report)
    assert text.startswith("<!-- bench:phone:start -->") and "llama.cpp not measured" in text
    again = PhoneReport(config, report.machine)  # the programs are reused while their settings match
    prepare(config, None, lambda what, done, total: None, again)
    assert again.exports == {ET_INT4: "reused", ET_FLOAT: "reused"}
