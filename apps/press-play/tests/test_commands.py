"""generate, chat and eval perplexity end to end on a tiny random Hugging Face checkpoint."""

from __future__ import annotations

import json
import math

import torch
from typer.testing import CliRunner

from press_play import cli

runner = CliRunner()


def _reference_ppl(folder, text: str, context: int) -> float:
    """transformers on the same checkpoint and tokens, non-overlapping windows."""
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM

    ids = torch.tensor(Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text).ids)
    model = LlamaForCausalLM.from_pretrained(folder).eval()
    nll, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids), context):
            w = ids[s : s + context]
            if len(w) < 2:
                continue
            logp = torch.log_softmax(model(w[None]).logits[0].double(), -1)
            nll -= logp[:-1].gather(-1, w[1:, None]).sum().item()
            n += len(w) - 1
    return math.exp(nll / n)


def test_eval_perplexity_json_matches_transformers(tiny_model_dir, text_file):
    args = [
        "eval",
        "perplexity",
        "--model",
        str(tiny_model_dir),
        "--text",
        str(text_file),
        "--context",
        "64",
        "--json",
    ]
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)  # the whole of stdout is one JSON object
    assert record["context"] == 64 and record["n_windows"] == math.ceil(record["n_tokens"] / 64)
    assert record["n_scored"] == record["n_tokens"] - record["n_windows"]
    ref = _reference_ppl(tiny_model_dir, text_file.read_text(), 64)
    assert math.isclose(record["ppl"], ref, rel_tol=1e-4)


def test_eval_perplexity_max_tokens_and_plain_output(tiny_model_dir, text_file):
    args = ["eval", "perplexity", "--model", str(tiny_model_dir), "--text", str(text_file), "--context", "32",
            "--max-tokens", "100"]  # fmt: skip
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("perplexity ") and "100 tokens in 4 windows of 32" in result.stderr


def test_eval_perplexity_context_beyond_the_model_is_one_line(tiny_model_dir, text_file):
    args = [
        "eval",
        "perplexity",
        "--model",
        str(tiny_model_dir),
        "--text",
        str(text_file),
        "--context",
        "1000",
    ]
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 1 and result.stderr.count("\n") == 1 and "max_seq_len" in result.stderr


def test_eval_perplexity_help_describes_the_windows():
    result = runner.invoke(cli.app, ["eval", "perplexity", "--help"])
    assert "non-overlapping windows of --context tokens" in " ".join(result.stdout.split())


def test_generate_raw_streams_text_and_reports_speed(tiny_model_dir):
    args = ["generate", "To be, or not", "--model", str(tiny_model_dir), "--raw", "--temperature", "0",
            "--max-new-tokens", "8"]  # fmt: skip
    first = runner.invoke(cli.app, args)
    assert first.exit_code == 0, first.output
    assert first.stdout.strip() and "tok/s" in first.stderr and "tok/s" not in first.stdout
    assert runner.invoke(cli.app, args).stdout == first.stdout  # greedy: the same text again


def test_generate_seed_makes_sampling_reproducible(tiny_model_dir):
    args = ["generate", "To be", "--model", str(tiny_model_dir), "--temperature", "1.5", "--top-p", "1",
            "--seed", "3", "-n", "12"]  # fmt: skip
    a, b = runner.invoke(cli.app, args), runner.invoke(cli.app, args)
    assert a.exit_code == 0 and a.stdout == b.stdout


def test_chat_keeps_history_resets_and_exits(tiny_model_dir):
    args = ["chat", "--model", str(tiny_model_dir), "--system", "Be brief.", "-n", "4", "--temperature", "0"]
    result = runner.invoke(
        cli.app, args, input="hello\nhow are you\n/reset\n/nope\nhello\n/exit\nnever read\n"
    )
    assert result.exit_code == 0, result.output
    assert result.stderr.count("tok/s") == 3
    assert "history cleared" in result.stderr and "unknown command /nope" in result.stderr


def test_chat_exits_cleanly_at_end_of_input(tiny_model_dir):
    result = runner.invoke(cli.app, ["chat", "--model", str(tiny_model_dir), "-n", "3"], input="hi\n")
    assert result.exit_code == 0, result.output
    assert result.stderr.count("tok/s") == 1


def test_tour_says_what_it_did(tiny_model_dir, text_file, monkeypatch):
    from press_play import tour

    # The tiny model's context is 256 tokens, so the tour scores the soliloquy in 64-token windows.
    monkeypatch.setattr(tour, "TEXT", str(text_file))
    monkeypatch.setattr(tour, "CONTEXT", 64)
    monkeypatch.setattr(tour, "MAX_TOKENS", 256)
    result = runner.invoke(cli.app, ["tour", "--model", str(tiny_model_dir)])
    assert result.exit_code == 0, result.output
    for step in ("1. loaded", "2. generating", "3. perplexity", "What was done", "Go further", "press-play chat"):  # fmt: skip
        assert step in result.stdout
    assert "tok/s" in result.stderr
