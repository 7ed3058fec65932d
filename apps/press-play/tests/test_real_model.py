"""The few checks only the real SmolLM2-135M-Instruct can make (slow: it loads from the zoo)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from press_play import cli

runner = CliRunner()


@pytest.mark.slow
def test_generate_answers_a_simple_question():
    result = runner.invoke(
        cli.app, ["generate", "What is the capital of France?", "--temperature", "0", "-n", "20"]
    )
    assert result.exit_code == 0, result.output
    assert "Paris" in result.stdout


@pytest.mark.slow
def test_hamlet_perplexity_matches_the_transformers_reference():
    # transformers: SmolLM2-135M-Instruct, first 4096 Hamlet tokens, 512-token windows -> ppl ~42.6.
    # The zoo model is the Q4_1 GGUF, so allow for its quantization error.
    args = ["eval", "perplexity", "--text", "hamlet", "--context", "512", "--max-tokens", "4096", "--json"]
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["n_windows"] == 8 and record["n_scored"] == 8 * 511
    assert record["ppl"] == pytest.approx(42.6, rel=0.05)
