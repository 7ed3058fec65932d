"""The command line's contract: versions, one-line errors with exit 1, the no-argument default."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from press_play import cli

runner = CliRunner()


def _one_error_line(result, *needles: str) -> str:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in result.output
    for n in needles:
        assert n in lines[0]
    return lines[0]


def test_version_lists_every_omni_distribution():
    result = runner.invoke(cli.app, ["--version"])
    assert result.exit_code == 0
    names = [line.split()[0] for line in result.stdout.splitlines()]
    assert {"omni-model", "omni-kv", "press-play"} <= set(names)
    assert all(n.startswith("omni-") or n in ("press-play", "phone-export") for n in names)
    assert all(len(line.split()) == 2 for line in result.stdout.splitlines())


def test_missing_model_path_is_one_line(tmp_path):
    missing = tmp_path / "no-such-model"
    result = runner.invoke(cli.app, ["generate", "hi", "--model", str(missing)])
    _one_error_line(result, str(missing))


def test_unknown_zoo_name_is_one_line():
    _one_error_line(runner.invoke(cli.app, ["generate", "hi", "--model", "not-a-model"]), "not-a-model")


def test_missing_text_file_is_one_line_naming_it(tmp_path, tiny_model_dir):
    missing = tmp_path / "missing.txt"
    args = ["eval", "perplexity", "--model", str(tiny_model_dir), "--text", str(missing)]
    _one_error_line(runner.invoke(cli.app, args), str(missing), "no such file")


def test_unknown_shakespeare_name_is_one_line(tiny_model_dir):
    args = ["eval", "perplexity", "--model", str(tiny_model_dir), "--text", "hamlett"]
    _one_error_line(runner.invoke(cli.app, args), "hamlett")


@pytest.mark.parametrize(("option", "value", "field"), [("--temperature", "-1", "temperature"),
                                                        ("--top-p", "0", "top_p"), ("--max-new-tokens", "0", "max_new_tokens")])  # fmt: skip
def test_bad_sampling_option_is_one_line(option, value, field):
    # Checked before the model loads: a bad option costs nothing.
    _one_error_line(runner.invoke(cli.app, ["generate", "hi", option, value]), field)


def test_bad_temperature_in_chat_is_one_line():
    _one_error_line(runner.invoke(cli.app, ["chat", "--temperature", "-0.5"]), "temperature")


def test_no_arguments_runs_the_default_action(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "DEFAULT_ACTION", lambda: calls.append(True))
    result = runner.invoke(cli.app, [])
    assert result.exit_code == 0 and calls == [True]


def test_ctrl_c_exits_quietly(monkeypatch):
    import omni_model

    def interrupted(source):
        raise KeyboardInterrupt

    monkeypatch.setattr(omni_model, "load", interrupted)
    result = runner.invoke(cli.app, ["generate", "hi"])
    assert result.exit_code == 130 and "interrupted" in result.stderr and "Traceback" not in result.output


def test_threads_sets_torch_threads(monkeypatch):
    monkeypatch.setattr(cli, "DEFAULT_ACTION", lambda: None)
    before = torch.get_num_threads()
    try:
        assert runner.invoke(cli.app, ["--threads", "1"]).exit_code == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_threads_must_be_positive(monkeypatch):
    monkeypatch.setattr(cli, "DEFAULT_ACTION", lambda: None)
    result = runner.invoke(cli.app, ["--threads", "0"])
    assert result.exit_code == 2 and "--threads" in result.stderr
