"""press-play train distill / pretrain / lora / moe on the tiny model: each writes its plan, metrics,
checkpoint and result, the result opens again, and bad input is one line."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from press_play import cli

runner = CliRunner()
FAST = ["--steps", "2", "--seq-len", "16", "--batch-size", "2", "--eval-every", "1"]


@pytest.fixture()
def docs(tmp_path, text_file):
    d = tmp_path / "docs"
    d.mkdir()
    for i in range(3):
        (d / f"part{i}.txt").write_text(text_file.read_text() * (i + 1), encoding="utf-8")
    return d


def run(tmp_path, *args: str):
    return runner.invoke(cli.app, ["train", *args, "--data-cache", str(tmp_path / "cache")])


def metrics(folder):
    return [json.loads(r) for r in (folder / "metrics.jsonl").read_text().splitlines()]


def test_distill_writes_a_student_that_loads(tiny_model_dir, docs, tmp_path):
    import omni_model

    r = run(tmp_path, "distill", "--teacher", str(tiny_model_dir), "--data", str(docs), "--out", str(tmp_path / "d"),
            "--student", "dense-30m", *FAST)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "d" / "plan.json").read_text())["plan"]["steps"] == 2
    assert metrics(tmp_path / "d")[-1]["final"]
    lm = omni_model.load(tmp_path / "d" / "model")
    assert lm.config.dim == 256 and lm.config.vocab_size == omni_model.load(tiny_model_dir).config.vocab_size


def test_lora_and_moe(tiny_model_dir, docs, tmp_path):
    r = run(
        tmp_path, "lora", "-m", str(tiny_model_dir), "--data", str(docs), "--out", str(tmp_path / "l"), *FAST
    )
    assert r.exit_code == 0, r.output
    assert (tmp_path / "l" / "adapters" / "adapter.safetensors").is_file()
    r = run(tmp_path, "moe", "-m", str(tiny_model_dir), "--data", str(docs), "--out", str(tmp_path / "m"),
            "--experts", "4", "--top-k", "2", *FAST)  # fmt: skip
    assert r.exit_code == 0, r.output
    load = [row["expert_load"] for row in metrics(tmp_path / "m") if "expert_load" in row]
    assert len(load) == 2 and len(load[0][0]) == 4


def test_heads_on_greedy_continuations(tiny_model_dir, docs, tmp_path):
    from omni_model import load
    from omni_train.heads import load_heads

    r = run(tmp_path, "heads", "-m", str(tiny_model_dir), "--data", str(docs), "--out", str(tmp_path / "h"),
            "--prompts", "4", "--new-tokens", "8", "--heads", "2", *FAST)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "head 1" in r.output and (tmp_path / "h" / "continuations.npy").is_file()
    heads = load_heads(tmp_path / "h" / "heads", load(tiny_model_dir, fuse=False).model)
    assert heads.config.n_heads == 2
    # Again in the same folder, drafting from a reduced vocabulary: the base's answers are reused (made the
    # same way), the heads record the vocabulary and the token counts it was chosen from.
    stream = tmp_path / "h" / "continuations.npy"
    made = stream.stat().st_mtime_ns
    r = run(tmp_path, "heads", "-m", str(tiny_model_dir), "--data", str(docs), "--out", str(tmp_path / "h"),
            "--prompts", "4", "--new-tokens", "8", "--heads", "2", "--draft-vocab", "50", *FAST)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert stream.stat().st_mtime_ns == made
    meta = json.loads((tmp_path / "h" / "heads" / "heads.json").read_text())
    assert meta["draft_vocab"] == 50 and (tmp_path / "h" / "heads" / "token-counts.npy").is_file()


def test_pretrain_resume_and_bad_input(tiny_model_dir, docs, tmp_path):
    base = ["--tokenizer-of", str(tiny_model_dir), "--data", str(docs), "--student", "dense-30m"]
    assert run(tmp_path, "pretrain", *base, "--out", str(tmp_path / "p"), *FAST).exit_code == 0
    more = ["--steps", "3", "--seq-len", "16", "--batch-size", "2", "--eval-every", "1"]
    r = run(tmp_path, "pretrain", *base, "--out", str(tmp_path / "p"), *more, "--resume")
    assert r.exit_code == 0, r.output
    assert [row["step"] for row in metrics(tmp_path / "p") if "loss" in row] == [1, 2, 3]
    for args, msg in (
        (["pretrain", *base, "--out", str(tmp_path / "x")], "give a budget"),
        (["pretrain", *base, "--out", str(tmp_path / "x"), "--budget-minutes", "1", "--budget-hours", "1"], "not both"),
        (["pretrain", *base, "--out", str(tmp_path / "x"), "--budget-minutes", "-1"], "budget must be positive"),
        (["pretrain", *base, "--out", str(tmp_path / "x"), "--steps", "2", "--resume"], "no state.json"),
        (["pretrain", *base[:2], "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "x"), "--steps", "2"], "nope"),
        (["distill", "--teacher", str(tiny_model_dir), "--student", "huge", "--data", str(docs), "--out",
          str(tmp_path / "x"), "--steps", "1"], "no student preset"),
    ):  # fmt: skip
        r = run(tmp_path, *args)
        assert r.exit_code == 1, (args, r.output)
        assert msg in r.output and "Traceback" not in r.output, r.output
