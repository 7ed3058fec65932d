"""press-play generate --speculative: the same greedy text as plain decoding on both engines, the
acceptance statistics on stderr, and one-line errors for bad proposers."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

import omni_model
from omni_model.medusa import HeadsConfig, MedusaHeads, save_heads
from press_play import cli

runner = CliRunner()
GEN = ["generate", "To be, or not to be, to be", "--raw", "--temperature", "0", "-n", "24"]


def _heads(model_dir, out, dim=None):
    cfg = omni_model.load(model_dir).config
    heads = MedusaHeads(dim or cfg.dim, HeadsConfig(n_heads=2))
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0, 0.05)
    return save_heads(heads, heads.config, out, base="tiny", base_sha256=None, base_dim=dim or cfg.dim,
                      vocab_size=cfg.vocab_size)  # fmt: skip


def test_speculative_generate_matches_plain_on_both_engines(tiny_model_dir, tmp_path):
    onnx, int4 = tmp_path / "onnx", tmp_path / "int4"
    for out, weights in ((onnx, "float32"), (int4, "int4")):
        r = runner.invoke(
            cli.app, ["export", "--model", str(tiny_model_dir), "--out", str(out), "--weights", weights]
        )
        assert r.exit_code == 0, r.output
    heads = _heads(tiny_model_dir, tmp_path / "heads")
    for model in (tiny_model_dir, onnx, int4):  # ONNX: plain --exact, as --speculative runs by default
        plain = runner.invoke(
            cli.app, [*GEN, "--model", str(model), *(["--exact"] if model != tiny_model_dir else [])]
        )
        assert plain.exit_code == 0, plain.output
        for spec in ("lookup", "lookup:2", f"draft:{tiny_model_dir}", f"heads:{heads}"):
            r = runner.invoke(
                cli.app, [*GEN, "--model", str(model), "--speculative", spec, "--draft-tokens", "3"]
            )
            assert r.exit_code == 0, r.output
            assert r.stdout == plain.stdout, (model, spec)
            assert "tokens per verification step" in r.stderr and "drafts kept" in r.stderr
    tree = runner.invoke(
        cli.app, [*GEN, "--model", str(tiny_model_dir), "--speculative", f"heads-tree:{heads}"]
    )
    assert tree.exit_code == 0 and "heads, tree of" in tree.stderr, tree.output
    assert tree.stdout == runner.invoke(cli.app, [*GEN, "--model", str(tiny_model_dir)]).stdout
    r = runner.invoke(cli.app, [*GEN, "--model", str(onnx), "--speculative", f"heads-tree:{heads}"])
    assert r.exit_code == 1 and "tree verification runs on the PyTorch engine" in r.output
    # the heads' ONNX form was made once per export, beside them
    made = [p for p in heads.iterdir() if p.name.startswith("onnx-")]
    assert len(made) == 2 and all(
        json.loads((m / "heads-manifest.json").read_text())["n_heads"] == 2 for m in made
    )


def test_bad_speculative_input_is_one_line(tiny_model_dir, tmp_path):
    wrong = _heads(tiny_model_dir, tmp_path / "wrong", dim=8)
    cases = {
        ("--speculative", "nope"): "must be lookup, lookup:N, draft:MODEL, heads:PATH or heads-tree:PATH",
        ("--speculative", "lookup:0"): "lookup:N takes the longest n-gram N",
        ("--speculative", "lookup", "--draft-tokens", "0"): "draft tokens must be an integer in 1..16",
        ("--speculative", "lookup", "--draft-tokens", "17"): "draft tokens must be an integer in 1..16",
        ("--draft-tokens", "5"): "--draft-tokens needs --speculative",
        ("--speculative", f"heads:{wrong}"): "heads trained for another base",
        ("--speculative", f"heads:{tmp_path}"): "not a Medusa heads folder",
        ("--exact",): "--exact: for the ONNX engine",
    }
    for args, message in cases.items():
        r = runner.invoke(cli.app, [*GEN, "--model", str(tiny_model_dir), *args])
        assert r.exit_code == 1, (args, r.output)
        assert message in r.output and "Traceback" not in r.output, (args, r.output)
