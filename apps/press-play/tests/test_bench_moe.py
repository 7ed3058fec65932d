"""`press_play.bench_moe`: a quick run end to end, its BENCHMARKS.md section and its markers.

No test here asserts a timing or a ratio: they depend on the machine and its load.
"""

from __future__ import annotations

import dataclasses
import math

import pytest

from press_play import bench, bench_moe
from press_play.bench import Stat
from press_play.bench_moe import MoEBenchConfig, MoECase


@pytest.fixture(scope="module")
def quick_report() -> bench_moe.MoEBenchReport:
    steps: list[tuple[str, int, int]] = []
    report = bench_moe.run_moe_bench(MoEBenchConfig.quick_config(), on_progress=lambda *a: steps.append(a))
    total = 2 * (1 + 2)  # per case: building its layers, then each token count
    assert [s[1] for s in steps] == list(range(total + 1)) and {s[2] for s in steps} == {total}
    return report


def test_quick_run_measures_every_case_and_token_count(quick_report):
    c = quick_report.config
    assert [(r.case, r.tokens) for r in quick_report.results] == [
        (case, t) for case in c.cases for t in c.tokens
    ]
    for r in quick_report.results:
        for s in (r.moe_ms, r.dense_ms, r.ratio):
            assert math.isfinite(s.median) and 0 < s.lo <= s.median <= s.hi
        assert len(r.loads) == r.case.n_experts
        # One round's calls route every token to K experts.
        assert sum(r.loads) == r.calls * r.tokens * r.case.top_k
        assert r.calls == -(-c.min_tokens // r.tokens)


def test_section_structure(quick_report):
    text = bench_moe.render_moe_section(quick_report)
    start, end = bench.markers(bench_moe.SECTION)
    assert text.startswith(start + "\n## MoE dispatch") and text.rstrip().endswith(end)
    assert "(quick run: not comparable)" in text
    assert "- Machine: " in text and " threads; " in text
    assert (
        "`just bench --suite moe --quick` (= `uv run python -m press_play.bench --suite moe --quick`)" in text
    )
    rows = [line for line in text.splitlines() if line.startswith("| ") and "experts ×" in line]
    assert len(rows) == len(quick_report.results)
    assert "| 16 experts × 32, top-2 | 64 (batch) |" in rows[0] and "max/mean" in rows[0]
    assert "| 1 (decode stream) |" in rows[1] and "2 of 16 per token" in rows[1]
    assert all(("<= 1.5x: met" in r) != ("<= 1.5x: not met" in r) for r in rows)


def test_section_round_trips_through_replace_section(quick_report):
    section = bench_moe.render_moe_section(quick_report)
    start, end = bench.markers(bench.SECTION)
    existing = f"# Benchmarks\n\n{start}\nsmollm2 numbers\n{end}\n\n## kept\ntext\n"
    once = bench.replace_section(existing, section, bench_moe.SECTION)
    assert once == existing.rstrip("\n") + "\n\n" + section  # appended, the rest untouched
    twice = bench.replace_section(once, section.replace("quick run", "QUICK"), bench_moe.SECTION)
    assert twice.count(bench.markers(bench_moe.SECTION)[0]) == 1 and "QUICK" in twice
    assert twice.startswith(existing.rstrip("\n")) and "smollm2 numbers" in twice
    # The SmolLM2 section can be rewritten without touching the MoE one.
    third = bench.replace_section(twice, f"{start}\nnew\n{end}\n", bench.SECTION)
    assert "smollm2 numbers" not in third and third.endswith(section.replace("quick run", "QUICK"))


def test_config_checks_and_command_line():
    with pytest.raises(ValueError, match="rounds"):
        MoEBenchConfig(rounds=0)
    with pytest.raises(ValueError, match="token counts"):
        MoEBenchConfig(tokens=(512, 0))
    assert bench_moe.command_line(MoEBenchConfig()) == " --suite moe"
    assert bench_moe.command_line(MoEBenchConfig(rounds=3)) == " --suite moe --rounds 3"
    assert MoECase(64, 4, 384).active_dim == 1536


def test_main_writes_only_its_section(tmp_path, capsys):
    path = tmp_path / "BENCHMARKS.md"
    start, end = bench.markers(bench.SECTION)
    path.write_text(f"# Benchmarks\n\n{start}\nsmollm2 numbers\n{end}\n")
    assert bench.main(["--suite", "moe", "--quick", "--out", str(path)]) == 0
    text = path.read_text()
    assert text.startswith(f"# Benchmarks\n\n{start}\nsmollm2 numbers\n{end}\n\n")
    assert text.count("| 64 experts × 16, top-4 |") == 2  # batch and decode rows
    assert capsys.readouterr().out in text  # the section printed is the section written


def test_ratio_at_the_target_shows_enough_digits(quick_report):
    at = dataclasses.replace(quick_report.results[0], ratio=Stat(1.502, 1.4, 1.6))
    report = dataclasses.replace(quick_report, results=[at])
    assert "| 1.502x (1.40–1.60) | <= 1.5x: not met |" in bench_moe.render_moe_section(report)
