"""press-play index build / query / stats on a folder of text, embedded by the tiny model or by
all-MiniLM-L6-v2."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from press_play import cli

runner = CliRunner()
PASSAGES = {
    "hamlet.txt": "To be, or not to be, that is the question. Whether 'tis nobler in the mind to suffer. "
    * 6,
    "sea.txt": "Or to take arms against a sea of troubles, and by opposing end them. To die, to sleep. " * 6,
}


def build_passages_index(model_dir, tmp_path, *extra: str, embedder: str = "lm"):
    """PASSAGES as a folder of text, indexed (flat, 16-token chunks) into tmp_path/idx."""
    src = tmp_path / "docs"
    src.mkdir()
    for name, text in PASSAGES.items():
        (src / name).write_text(text, encoding="utf-8")
    idx = tmp_path / "idx"
    result = runner.invoke(cli.app, ["index", "build", str(src), "--out", str(idx), "--model", str(model_dir),
                                     "--chunk-tokens", "16", "--kind", "flat", "--embedder", embedder, *extra])  # fmt: skip
    assert result.exit_code == 0, result.output
    return idx


def test_build_query_stats(tiny_model_dir, tmp_path):
    idx = build_passages_index(tiny_model_dir, tmp_path, "--budget", "1MB")
    chunks = [json.loads(line) for line in (idx / "chunks.jsonl").read_text().splitlines()]
    assert {c["file"].split("/")[-1] for c in chunks} == set(PASSAGES) and len(chunks) > 4
    assert json.loads((idx / "budget.json").read_text())["budget_bytes"] == 10**6
    # A chunk's own text finds that chunk first (the same tokens embed to the same vector).
    probe = chunks[len(chunks) - 2]["text"]
    result = runner.invoke(cli.app, ["index", "query", str(idx), probe, "-k", "3"], terminal_width=200)
    assert result.exit_code == 0, result.output
    first_row = next(line for line in result.stdout.splitlines() if "sea.txt" in line or "hamlet.txt" in line)
    assert "1.000" in first_row
    stats = json.loads(runner.invoke(cli.app, ["index", "stats", str(idx)]).stdout)
    assert stats["count"] == len(chunks) and stats["kind"] == "flat"


def test_minilm_finds_the_passage_by_meaning(tiny_model_dir, tmp_path):
    idx = build_passages_index(tiny_model_dir, tmp_path, embedder="minilm")
    assert json.loads((idx / "index.json").read_text())["meta"]["embedding"]["kind"] == "minilm"
    # No words in common with sea.txt's "take arms against a sea of troubles" but the meaning.
    result = runner.invoke(cli.app, ["index", "query", str(idx), "fighting an ocean of problems", "-k", "1"],
                           terminal_width=200)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "sea.txt" in result.stdout and "hamlet.txt" not in result.stdout
    result = runner.invoke(cli.app, ["index", "build", str(idx.parent / "docs"), "--out", str(tmp_path / "x"),
                                     "--embedder", "bert"])  # fmt: skip
    assert result.exit_code == 1 and "--embedder bert" in result.output


def test_bad_sources_are_one_line(tiny_model_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    result = runner.invoke(cli.app, ["index", "build", str(tmp_path / "empty"), "--out", str(tmp_path / "i"),
                                     "--model", str(tiny_model_dir)])  # fmt: skip
    assert result.exit_code == 1 and "holds no text files" in result.output
    result = runner.invoke(cli.app, ["index", "stats", str(tmp_path)])
    assert result.exit_code == 1 and "no index.json" in result.output
    assert not (tmp_path / "i").exists()


def test_build_from_a_npy_of_vectors(tmp_path):
    import numpy as np

    np.save(tmp_path / "v.npy", np.random.default_rng(0).normal(size=(300, 16)).astype(np.float32))
    result = runner.invoke(cli.app, ["index", "build", str(tmp_path / "v.npy"), "--out", str(tmp_path / "i"),
                                     "--kind", "pq", "--bytes-per-vector", "4"])  # fmt: skip
    assert result.exit_code == 0, result.output
    stats = json.loads(runner.invoke(cli.app, ["index", "stats", str(tmp_path / "i")]).stdout)
    assert stats["count"] == 300 and stats["code_bytes"] == 4 and stats["compression"] == 16
    np.save(tmp_path / "bad.npy", np.zeros(5, np.float32))
    result = runner.invoke(
        cli.app, ["index", "build", str(tmp_path / "bad.npy"), "--out", str(tmp_path / "j")]
    )
    assert result.exit_code == 1 and "expected a 2-D float array" in result.output


def test_knn_datastore_lowers_perplexity_on_its_own_text(tiny_model_dir, text_file, tmp_path):
    result = runner.invoke(cli.app, ["index", "datastore", str(text_file), "--out", str(tmp_path / "ds"),
                                     "--model", str(tiny_model_dir), "--kind", "flat"])  # fmt: skip
    assert result.exit_code == 0, result.output
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
    plain = json.loads(runner.invoke(cli.app, args).stdout)["ppl"]
    with_knn = runner.invoke(cli.app, [*args, "--knn", str(tmp_path / "ds")])
    assert with_knn.exit_code == 0, with_knn.output
    assert json.loads(with_knn.stdout)["ppl"] < 0.5 * plain
    # lambda = 0: the model's own predictions, whatever the neighbours say
    none = runner.invoke(cli.app, [*args, "--knn", str(tmp_path / "ds"), "--knn-settings", "lambda=0,k=4"])
    assert none.exit_code == 0 and abs(json.loads(none.stdout)["ppl"] / plain - 1) < 1e-4, none.output
    bad = runner.invoke(cli.app, [*args, "--knn", str(tmp_path / "ds"), "--knn-settings", "lambda=2"])
    assert bad.exit_code == 1 and "0 <= lambda <= 1" in bad.output
    bad = runner.invoke(cli.app, [*args, "--knn-settings", "k=4"])
    assert bad.exit_code == 1 and "--knn-settings needs --knn" in bad.output
    gen = runner.invoke(cli.app, ["generate", "To be", "--raw", "-n", "8", "--temperature", "0", "--model",
                                  str(tiny_model_dir), "--knn", str(tmp_path / "ds")])  # fmt: skip
    assert gen.exit_code == 0 and gen.stdout.strip(), gen.output


def test_generate_with_rag_reports_its_sources(tiny_model_dir, tmp_path):
    idx = build_passages_index(tiny_model_dir, tmp_path)
    gen = ["generate", "Or to take arms against a sea of troubles", "-n", "6", "--temperature", "0",
           "--model", str(tiny_model_dir), "--rag", str(idx), "--rag-k", "2"]  # fmt: skip
    result = runner.invoke(cli.app, gen)
    assert result.exit_code == 0, result.output
    assert "[1] sea.txt" in result.stderr and "[2]" in result.stderr  # the best passage comes from sea.txt
    result = runner.invoke(cli.app, [*gen, "--raw"])
    assert result.exit_code == 1 and "does not combine with --raw" in result.output
