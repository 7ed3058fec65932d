"""The ONNX benchmark suite end to end in its quick form (OmniCoder's engine only: no peer environment)."""

from __future__ import annotations

import math

import pytest

from press_play.bench_onnx import ABLATION, INT8_KV, OnnxBenchConfig, render_onnx_section, run_onnx_bench


@pytest.mark.slow
def test_quick_run_measures_and_renders(tmp_path):
    report = run_onnx_bench(OnnxBenchConfig.quick_config(work_dir=str(tmp_path)))
    assert list(report.engines) == ["omnicoder-onnx", ABLATION, INT8_KV]
    assert "ppl" not in report.engines[ABLATION]  # its outputs are wrong by construction
    run = report.engines["omnicoder-onnx"]["runs"][0]
    assert all(
        run[k] > 0 and math.isfinite(run[k]) for k in ("decode_tok_s_short", "prefill_tok_s", "peak_rss_mb")
    )
    assert abs(report.engines["omnicoder-onnx"]["ppl"] / report.float32_ppl - 1) < 0.02
    text = render_onnx_section(report)
    assert text.startswith("<!-- bench:onnx-int4:start -->") and "peers not measured" in text
    assert "Where OmniCoder's decode time goes" in text
