"""press-play kv plan: a row per cache kind with figures the planner computes; bad input in one line."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import omni_model
from omni_kv import CacheSpec
from omni_kv.spec import parse_size
from press_play import cli

runner = CliRunner()


def test_plan_gives_each_kind_its_longest_context(tiny_model_dir):
    result = runner.invoke(cli.app, ["kv", "plan", "--model", str(tiny_model_dir), "--budget", "1MB",
                                     "--kv", "dense", "--kv", "int8", "--kv", "sink", "--context", "100"],
                           terminal_width=200)  # fmt: skip
    assert result.exit_code == 0, result.output
    cfg = omni_model.load(tiny_model_dir).config
    dims = (cfg.n_layers, cfg.n_kv_heads, cfg.head_size)
    for kind in ("dense", "int8"):
        longest = CacheSpec.parse(kind).max_context(10**6, *dims)
        assert f"{longest:,}" in result.output
    assert "unbounded" in result.output


@pytest.mark.parametrize(
    ("args", "what"),
    [(["--budget", "2XB"], "not a positive size"), (["--budget", "10"], "smaller than one token"),
     (["--kv", "kivi:bits=3"], "KIVI bits must be 4 or 8")],
)  # fmt: skip
def test_bad_input_is_one_line(tiny_model_dir, args, what):
    result = runner.invoke(cli.app, ["kv", "plan", "--model", str(tiny_model_dir), *args])
    assert result.exit_code == 1 and what in result.output and "Traceback" not in result.output


def test_parse_size():
    assert parse_size("2GB", "x") == 2 * 10**9 and parse_size("512MiB", "x") == 512 * 2**20
    assert parse_size("64", "x") == 64


def test_generate_and_eval_take_a_kv_cache_kind(tiny_model_dir, text_file):
    gen = ["generate", "To be", "--raw", "--temperature", "0", "-n", "10", "--model", str(tiny_model_dir)]
    dense = runner.invoke(cli.app, gen)
    int8 = runner.invoke(cli.app, [*gen, "--kv", "int8"])
    sink = runner.invoke(
        cli.app, [*gen, "--kv", "sink:sinks=2,window=64"]
    )  # holds the whole prompt: as dense
    assert dense.exit_code == int8.exit_code == sink.exit_code == 0, int8.output + sink.output
    assert sink.stdout == dense.stdout
    args = ["eval", "perplexity", "--model", str(tiny_model_dir), "--text", str(text_file), "--context", "64"]
    for kind in ("kivi:group=16,residual=16", "paged:budget_bytes=64KiB,page_tokens=8"):
        result = runner.invoke(cli.app, [*args, "--kv", kind, "--json"])
        assert result.exit_code == 0, result.output


def test_kv_errors_are_one_line(tiny_model_dir, tmp_path):
    result = runner.invoke(cli.app, ["generate", "hi", "--model", str(tiny_model_dir), "--kv", "int3"])
    assert result.exit_code == 1 and "kind must be one of" in result.output
    (tmp_path / "manifest.json").write_text("{}")
    result = runner.invoke(cli.app, ["generate", "hi", "--model", str(tmp_path), "--kv", "int8"])
    assert result.exit_code == 1 and "fixed at export" in result.output
