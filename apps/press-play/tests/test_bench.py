"""`press_play.bench`: the arithmetic, the BENCHMARKS.md section writer, and one quick worker run.

No test here asserts a timing: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from press_play import bench, bench_worker
from press_play.bench import END, START, BenchConfig, BenchReport, Stat


def sample(engine: str, prefill: float, decode: float, peak: float) -> dict:
    return {"engine": engine, "prefill_tok_s": prefill, "decode_tok_s": decode, "peak_rss_mb": peak,
            "model_rss_mb": peak - 300, "load_s": 1.0, "n_params": 1000, "bytes_per_token": 2000,
            "tied": True, "tokens": [1, 2, 3, 4]}  # fmt: skip


def fake_report(rounds: int = 3) -> BenchReport:
    config = BenchConfig(rounds=rounds)
    samples = {
        "omnicoder": [sample("omnicoder", 900 + i, 25.0 + i, 800) for i in range(rounds)],
        "transformers": [sample("transformers", 1000, 10.0, 1000) for _ in range(rounds)],
    }
    samples["transformers"][0]["tokens"] = [1, 2, 9, 4]
    bw = {"mb": 1024, "repeats": 9, "sum_bytes_per_s": 9e4, "gemv_bytes_per_s": 1e5, "bytes_per_s": 1e5}
    return BenchReport(
        config=config, options=bench.command_line(config), machine=bench.machine_info(2), samples=samples,
        bandwidth=bw, matching_tokens=2, total_tokens=4,
        stats={e: bench.summarize(s) for e, s in samples.items()},
    )  # fmt: skip


def test_stat_median_and_spread():
    assert Stat.of([3.0, 1.0, 2.0]) == Stat(2.0, 1.0, 3.0)
    assert Stat.of([4.0, 1.0, 2.0, 3.0]) == Stat(2.5, 1.0, 4.0)  # even count: mean of the middle two
    with pytest.raises(ValueError):
        Stat.of([])


def test_ratio_and_matching_prefix():
    assert bench.ratio(50.0, 20.0) == 2.5
    assert math.isnan(bench.ratio(1.0, 0.0))
    assert bench.matching_prefix([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert bench.matching_prefix([1, 2, 3], [1, 2, 3]) == 3


def test_report_ratios_and_bound():
    r = fake_report()
    assert r.stats["omnicoder"]["decode_tok_s"] == Stat(26.0, 25.0, 27.0)
    assert r.ratio("decode_tok_s") == pytest.approx(2.6)
    assert r.ratio("prefill_tok_s") == pytest.approx(0.901)
    assert r.bound_tok_s == pytest.approx(50.0)  # 1e5 bytes/s over 2000 bytes a token


def test_section_renders_table_targets_and_bound():
    text = bench.render_section(fake_report())
    assert text.startswith(START) and text.rstrip().endswith(END)
    assert (
        "| decode tok/s | 128 greedy steps, KV cache | 26.0 (25.0–27.0) | 10.0 (10.0–10.0) | 2.60x | >= 2x: met |"
        in text
    )
    assert "| prefill tok/s |" in text and "0.90x | >= 1x: not met |" in text
    assert "**50.0 tok/s**" in text and "**52%**" in text  # 26 of a 50 tok/s bound
    assert "2 of 4" in text
    assert "`just bench --rounds 3` (= `uv run python -m press_play.bench --rounds 3`)" in text


def test_replace_section_keeps_the_rest():
    section = f"{START}\nnew\n{END}\n"
    # A new file gets the header, then the section.
    fresh = bench.replace_section("", section, bench.SECTION)
    assert fresh.startswith("# Benchmarks") and fresh.endswith(section)
    # An existing section is replaced in place; text before and after it is kept byte for byte.
    existing = f"# Mine\n\nintro\n\n{START}\nold\n{END}\n\n## other bench\nkeep me\n"
    out = bench.replace_section(existing, section, bench.SECTION)
    assert out == f"# Mine\n\nintro\n\n{START}\nnew\n{END}\n\n## other bench\nkeep me\n"
    assert bench.replace_section(out, section, bench.SECTION) == out  # idempotent
    # No markers yet: the section is appended, the file's own text untouched.
    assert bench.replace_section("# Mine\n", section, bench.SECTION) == f"# Mine\n\n{section}"


def test_write_markdown_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(f"# Benchmarks\n\n{START}\nold\n{END}\n\n## llama.cpp\nkept\n")
    bench.write_markdown(fake_report(), path)
    text = path.read_text()
    assert "old" not in text and "| decode tok/s |" in text and text.endswith("## llama.cpp\nkept\n")
    assert os.listdir(tmp_path) == ["BENCHMARKS.md"]  # no temp file left behind

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(bench.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        bench.write_markdown(fake_report(rounds=1), path)
    assert path.read_text() == text  # the old file is untouched
    assert os.listdir(tmp_path) == ["BENCHMARKS.md"]


def test_arguments_and_command_line():
    args = bench.parse_args([])
    assert list(args.configs) == [
        "smollm2",
        "moe",
        "mla",
        "onnx",
        "kv",
        "retrieval",
        "train",
        "distill",
        "speculative",
        "phone",
        "build",
        "media",
        "omni",
    ]  # every suite by default
    config = args.configs["smollm2"]
    assert config == BenchConfig() and args.out is not None and args.out.name == "BENCHMARKS.md"
    assert bench.command_line(config) == ""
    args = bench.parse_args(["--quick", "--rounds", "2"])
    config = args.configs["smollm2"]
    assert config.quick and config.decode_tokens == 16 and config.rounds == 2 and args.out is None
    assert (
        args.configs["moe"].quick and args.configs["moe"].rounds == 2
    )  # --quick and --rounds reach every suite
    assert bench.command_line(config) == " --quick --rounds 2"
    with pytest.raises(ValueError, match="rounds"):
        BenchConfig(rounds=0)
    with pytest.raises(SystemExit):
        bench.parse_args(["--rounds", "0"])


def test_suite_option_picks_one():
    assert list(bench.parse_args(["--suite", "moe"]).configs) == ["moe"]
    assert list(bench.parse_args(["--suite", "smollm2", "--model", "x"]).configs) == ["smollm2"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--suite", "nope"])
    sections = {s.section for s in bench.suites().values()}
    assert len(sections) == len(bench.suites())  # each suite owns its own markers


def test_weight_bytes_per_token_tied():
    emb = torch.nn.Embedding(100, 8)
    head = torch.nn.Linear(8, 100, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleDict({"emb": emb, "mid": torch.nn.Linear(8, 8, bias=False), "head": head})
    # The tied matrix is read whole by the head, plus one row by the lookup, plus the middle layer.
    assert bench_worker.weight_bytes_per_token(model, emb, head) == (100 * 8 + 8 + 8 * 8) * 4


def test_prompt_ids(tiny_model_dir, text_file):
    ids = bench.prompt_ids(str(tiny_model_dir), str(text_file), 16)
    assert len(ids) == 16 and all(isinstance(i, int) for i in ids)
    with pytest.raises(bench.DataError, match="fewer than"):
        bench.prompt_ids(str(tiny_model_dir), str(text_file), 10**6)


def test_bandwidth_measures_something():
    bw = bench_worker.measure_bandwidth(mb=8, repeats=2)
    assert bw["bytes_per_s"] == max(bw["sum_bytes_per_s"], bw["gemv_bytes_per_s"]) > 0


def test_worker_runs_our_engine_on_a_tiny_model(tiny_model_dir):
    spec = {"engine": "omnicoder", "model": str(tiny_model_dir), "prompt": list(range(3, 35)),
            "decode_tokens": 8, "threads": 2}  # fmt: skip
    result = bench.run_worker(spec, timeout_s=600)
    assert result["engine"] == "omnicoder" and result["threads"] == 2
    assert len(result["tokens"]) == 9  # the prefill's token and 8 decoded
    assert result["prefill_tok_s"] > 0 and result["decode_tok_s"] > 0
    assert result["peak_rss_mb"] >= result["rss_before_load_mb"] > 0
    # Untied tiny Llama (vocab 320, dim 64): everything but the embedding matrix, plus one row.
    assert not result["tied"]
    assert result["bytes_per_token"] == (result["n_params"] - 320 * 64 + 64) * 4


def test_worker_failure_is_a_bench_error(tmp_path):
    spec = {"engine": "omnicoder", "model": str(tmp_path / "missing"), "prompt": [1, 2], "decode_tokens": 1}
    with pytest.raises(bench.BenchError, match="exited with"):
        bench.run_worker(spec, timeout_s=600)


def test_no_module_beside_the_worker_scripts_shadows_the_standard_library():
    # bench_onnx_worker.py runs as a plain script, so its folder comes first on sys.path: a module named
    # like a standard one (profile.py shadowed `profile`, and torch's import of cProfile broke) breaks it.
    import sys
    from pathlib import Path

    import press_play

    folder = Path(press_play.__file__).parent
    assert not [p.name for p in folder.glob("*.py") if p.stem in sys.stdlib_module_names]
