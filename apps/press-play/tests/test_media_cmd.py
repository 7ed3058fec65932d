"""`press-play media train --quick`: the folder it writes opens with the library's own loaders and in
ONNX Runtime, and it never overwrites a folder that is not its own."""

from __future__ import annotations

import json

import numpy as np
import torch
from typer.testing import CliRunner

from omni_media.codec import load_codec
from omni_media.image_tokenizer import load_image_tokenizer
from omni_media.interpolate import load_interpolator
from omni_runtime.media import MediaRuntime
from press_play.cli import app

runner = CliRunner()


def test_quick_train_writes_checkpoints_graphs_and_figures(tmp_path):
    out = tmp_path / "media"
    result = runner.invoke(app, ["media", "train", "--quick", "--out", str(out), "--threads", "1"])
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
