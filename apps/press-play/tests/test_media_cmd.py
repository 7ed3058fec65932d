"""`press-play media train --quick`: the folder it writes opens with the library's own loaders and in
ONNX Runtime, and it never overwrites a folder that is not its own. `press-play train omni --quick`
builds on that folder: the any-to-any model's folder opens with omni_model.load and holds its figures."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from omni_media.codec import load_codec
from omni_media.image_tokenizer import load_image_tokenizer
from omni_media.interpolate import load_interpolator
from omni_runtime.media import MediaRuntime
from press_play.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def quick_media(tmp_path_factory):
    out = tmp_path_factory.mktemp("media") / "media"
    return out, runner.invoke(app, ["media", "train", "--quick", "--out", str(out), "--threads", "1"])


def test_quick_train_writes_checkpoints_graphs_and_figures(quick_media):
    out, result = quick_media
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output and "image tokenizer: PSNR" in result.output
    record = json.loads((out / "media-tokenizers.json").read_text())
    assert set(record["figures"]) == {"image", "video", "audio"} and record["keyframe_every"] == 4
    assert all(err <= 1e-3 for err in record["onnx"].values())
    tok = load_image_tokenizer(out / "image_tokenizer.safetensors")
    load_interpolator(out / "interpolator.safetensors")
    codec = load_codec(out / "codec.safetensors")
    rt = MediaRuntime(out / "onnx")
    assert sorted(rt.names) == [
        "audio_decoder",
        "audio_encoder",
        "image_decoder",
        "image_encoder",
        "interpolator",
    ]
    images = np.random.default_rng(0).random((2, 1, 28, 28), dtype=np.float32)
    with torch.no_grad():
        assert np.array_equal(
            rt.run("image_encoder", images)[0], tok.encode(torch.from_numpy(images)).numpy()
        )
    wave = (0.1 * np.random.default_rng(1).standard_normal((1, 8000))).astype(np.float32)
    with torch.no_grad():
        assert np.array_equal(rt.run("audio_encoder", wave)[0], codec.encode(torch.from_numpy(wave)).numpy())


def test_refuses_a_folder_that_is_not_its_own(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    result = runner.invoke(app, ["media", "train", "--quick", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "is not a media tokenizers folder" in result.output and "Traceback" not in result.output
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_train_omni_quick_writes_a_loadable_model_with_its_figures(quick_media, tmp_path):
    import omni_model

    media, made = quick_media
    assert made.exit_code == 0, made.output
    out = tmp_path / "omni"
    result = runner.invoke(app, ["train", "omni", "--quick", "--media", str(media), "--budget-hours", "0.1",
                                 "--out", str(out), "--threads", "1"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output and "image -> text" in result.output
    lm = omni_model.load(out)
    assert lm.config.mla is not None and lm.config.moe is not None
    assert lm.tokenizer.decode(lm.tokenizer.encode("draw a seven")) == "draw a seven"
    figures = json.loads((out / "omni.json").read_text())
    assert figures["training"]["steps"] > 0
    for key in ("image_to_text", "speech_to_text_words", "video_to_text"):
        assert 0 <= figures["understanding"][key] <= 1
    assert {
        "text_to_image",
        "text_to_image_reranked",
        "text_to_speech",
        "text_to_video",
        "text_to_video_reranked",
    } <= set(figures["generation"])
    # its own folder is replaced; another is refused
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    refused = runner.invoke(app, ["train", "omni", "--quick", "--out", str(tmp_path / "other")])
    assert refused.exit_code == 1 and "is not an omni model folder" in refused.output
    assert "Traceback" not in refused.output
    bad = runner.invoke(app, ["train", "omni", "--quick", "--media", str(tmp_path), "--out", str(out)])
    assert bad.exit_code == 1 and "not a `press-play media train` folder" in bad.output
