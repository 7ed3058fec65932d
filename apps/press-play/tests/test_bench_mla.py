"""The MLA benchmark suite: its cache figures agree with the configs, its quick run renders a section."""

from __future__ import annotations

import math

from omni_model.config import ModelConfig
from press_play.bench_mla import KV_SHAPES, MLABenchConfig, kv_rows, render_mla_section, run_mla_bench


def test_cache_bytes_agree_with_the_config_arithmetic():
    for row, s in zip(kv_rows(), KV_SHAPES, strict=True):
        mla = ModelConfig(vocab_size=8, dim=s.n_heads * 8, n_layers=s.n_layers, n_heads=s.n_heads,
                          n_kv_heads=s.n_heads, ffn_dim=8, head_dim=s.mla.qk_head_dim, mla=s.mla)  # fmt: skip
        assert row.mla_bytes == mla.kv_bytes_per_token(bytes_per_value=2)
        if s.head_dim:
            gqa = ModelConfig(vocab_size=8, dim=s.n_heads * 8, n_layers=s.n_layers, n_heads=s.n_heads,
                              n_kv_heads=s.n_kv_heads, ffn_dim=8, head_dim=s.head_dim)  # fmt: skip
            assert row.gqa_bytes == gqa.kv_bytes_per_token(bytes_per_value=2)
    deepseek = kv_rows()[0]
    assert deepseek.mla_bytes == 61 * (512 + 64) * 2 and deepseek.gqa_bytes == 61 * 128 * (192 + 128) * 2


def test_quick_run_renders_a_section():
    report = run_mla_bench(MLABenchConfig.quick_config())
    assert all(len(v) == 1 and v[0] > 0 and math.isfinite(v[0]) for v in report.tok_s.values())
    assert report.max_logit_diff <= 1e-4
    text = render_mla_section(report)
    assert text.startswith("<!-- bench:mla:start -->") and text.rstrip().endswith("<!-- bench:mla:end -->")
    assert "| absorbed |" in text and "71.1x smaller" in text and "--suite mla --quick" in text
