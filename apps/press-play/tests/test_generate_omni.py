"""press-play export --format omni, then generate on the bundle: image, speech and video questions, and
image, speech and video answers written to PNG, WAV and MP4 that read back; bad inputs are one line.

The model is a tiny untrained OmniModel saved by press_play.omni_cmd.save_omni (no training run)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from press_play import cli

pytestmark = pytest.mark.export
runner = CliRunner()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from omni_media.codec import AudioCodec, CodecConfig
    from omni_media.image_tokenizer import ImageTokenizer, ImageTokenizerConfig
    from omni_media.interpolate import InterpolatorConfig, KeyframeInterpolator
    from omni_media.verifier import CrossModalVerifier, VerifierConfig
    from omni_train.omni import OmniConfig, OmniModel
    from press_play.media_cmd import TrainedMedia
    from press_play.omni_cmd import OmniRun, save_omni

    torch.set_num_threads(1)
    torch.manual_seed(1)
    config = OmniConfig(dim=32, n_layers=2, n_heads=2, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=8,
                        v_head_dim=8, expert_dim=32, encoder_width=4, speech_width=8)  # fmt: skip
    media = TrainedMedia(
        ImageTokenizer(ImageTokenizerConfig(widths=(8, 16), levels=(8, 5, 5, 5))).eval(),
        KeyframeInterpolator(InterpolatorConfig(channels=4, hidden=8)).eval(),
        AudioCodec(CodecConfig(channels=16, n_blocks=1, levels=(8, 5, 5, 5), n_q=2)).eval(),
        {}, 40,
    )  # fmt: skip
    verifier = CrossModalVerifier(VerifierConfig(dim=8, image_width=4, audio_width=8)).eval()
    root = tmp_path_factory.mktemp("omni-cli")
    save_omni(OmniRun(OmniModel(config).eval(), media, verifier, {"note": "untrained"}), root / "model")
    result = runner.invoke(cli.app, ["--threads", "1", "export", "--model", str(root / "model"), "--format", "omni",
                                     "--out", str(root / "bundle")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "float32 decoder, 9 media graphs" in result.stdout and "parity against PyTorch" in result.output
    return root


@pytest.fixture(scope="module")
def inputs(bundle):
    from omni_media.video import write_video
    from omni_runtime.omni import write_wav

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), mode="L").save(bundle / "digit.png")
    t = np.arange(24000) / 16000
    write_wav(bundle / "speech.wav", 0.3 * np.sin(2 * np.pi * 220 * t), 16000)
    frames = np.zeros((9, 40, 40), np.uint8)
    for i in range(9):
        frames[i, 10:30, 2 + 3 * i : 12 + 3 * i] = 255  # a bar moving right
    write_video(
        bundle / "clip.mp4",
        frames,
        fps=8.0,
        audio=(0.3 * np.sin(2 * np.pi * 300 * t[:16000])).astype(np.float32),
    )
    return {"--image": bundle / "digit.png", "--audio": bundle / "speech.wav", "--video": bundle / "clip.mp4"}


def _generate(bundle, *args):
    return runner.invoke(
        cli.app, ["--threads", "1", "generate", "--model", str(bundle / "bundle"), *map(str, args)]
    )


@pytest.mark.parametrize(
    ("option", "prompt"),
    [("--image", "what digit is this?"), ("--audio", "transcribe the audio"),
     ("--video", "which digit moves, and which way? what is said?")],
)  # fmt: skip
def test_answers_questions_about_media(option, prompt, bundle, inputs):
    from omni_runtime.omni import OmniRuntime

    result = _generate(bundle, prompt, option, inputs[option], "-n", 20)
    assert result.exit_code == 0, result.output
    rt = OmniRuntime(bundle / "bundle", threads=1)
    want = rt.answer(prompt, max_new_tokens=20, **{option.removeprefix("--"): inputs[option]})
    assert result.stdout == want + "\n"


def test_writes_media_that_reads_back(bundle, inputs, tmp_path):
    from omni_media.audio import read_wav
    from omni_media.video import read_video
    from omni_runtime.omni import OmniRuntime, read_clip

    result = _generate(bundle, "draw a seven", "--output-modality", "image", "--output", tmp_path / "seven.png",
                       "--guidance", "2")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "wrote" in result.stdout and "28 x 28 image" in result.stdout
    with Image.open(tmp_path / "seven.png") as img:
        assert img.size == (28, 28) and img.mode == "L"
    # several candidates: the one the bundle's verifier ranks first is written
    result = _generate(bundle, "draw a seven", "--output-modality", "image", "--output", tmp_path / "best.png",
                       "--candidates", "3", "--seed", "4")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "the verifier's pick of 3 (scores" in result.output
    rt = OmniRuntime(bundle / "bundle", threads=1)
    best = rt.generate_media("draw a seven", "image", 3, seed=4)[0]
    with Image.open(tmp_path / "best.png") as img:
        assert np.array_equal(np.asarray(img), best)
    result = _generate(bundle, "say one two", "--output-modality", "audio", "--output", tmp_path / "say.wav",
                       "--temperature", "1", "--seed", "3")  # fmt: skip
    assert result.exit_code == 0, result.output
    words = int(result.stdout.split(": ")[1].split()[0])
    assert 1 <= words <= 3 and len(read_wav(tmp_path / "say.wav")) == words * 10240 + (words - 1) * 1600
    result = _generate(
        bundle, "show a seven moving left", "--output-modality", "video", "--output", tmp_path / "v.mp4"
    )
    assert result.exit_code == 0, result.output
    clip = read_video(tmp_path / "v.mp4")
    assert clip.frames.shape == (9, 40, 40, 3)
    # and the runtime's own MP4 reader sees what was written (frames of the moving bar, its sound)
    frames, sound = read_clip(inputs["--video"])
    assert frames.shape == (9, 40, 40) and sound is not None and abs(len(sound) - 16000) < 2048
    assert frames[0, 20, 6] > 200 and frames[0, 20, 30] < 50 and frames[8, 20, 30] > 200


def test_bad_inputs_are_one_line_errors(bundle, inputs, tmp_path):
    tampered = shutil.copytree(bundle / "bundle", tmp_path / "tampered")
    m = json.loads((tampered / "omni-bundle.json").read_text())
    (tampered / "decoder" / "tokenizer.json").write_text("{}")
    assert "decoder/tokenizer.json" in m["files"]
    cases = [
        (["what is this?", "--image", tmp_path / "none.png"], "not a readable image"),
        (["what is this?", "--video", inputs["--audio"]], "no video stream"),
        (["what is this?", "--audio", inputs["--image"]], "not a readable PCM WAV"),
        (["paint a seven", "--output-modality", "image", "--output", tmp_path / "x.png"], "not in the model's vocabulary: paint"),
        (["draw a seven", "--output-modality", "image"], "go together"),
        (["draw a seven", "--output-modality", "smell", "--output", tmp_path / "x.png"], "must be image, audio or video"),
        (["draw a seven", "--output-modality", "image", "--output", tmp_path / "x.jpg"], "written as .png"),
        (["draw a seven", "--engine", "torch"], "an omni bundle runs with onnx"),
        (["draw a seven", "--output-modality", "image", "--output", tmp_path / "x.png", "--guidance", "0"], "must be in (0, 100]"),
        (["what is this?", "--image", inputs["--image"], "--guidance", "2"], "needs --output-modality"),
        (["draw a seven", "--output-modality", "image", "--output", tmp_path / "x.png", "--candidates", "0"], "must be in 1..64"),
        (["what is this?", "--image", inputs["--image"], "--candidates", "2"], "needs --output-modality"),
    ]  # fmt: skip
    results = [(_generate(bundle, *args), message) for args, message in cases]
    results.append((runner.invoke(cli.app, ["generate", "what?", "--model", str(tmp_path), "--image",
                                            str(inputs["--image"])]), "take an omni bundle"))  # fmt: skip
    results.append(
        (runner.invoke(cli.app, ["generate", "what?", "--model", str(tampered)]), "sha256 differs")
    )
    results.append((runner.invoke(cli.app, ["export", "--model", str(bundle / "model"), "--format", "omni", "--out",
                                            str(tmp_path / "b"), "--kv", "int8"]), "no --max-seq-len, --kv"))  # fmt: skip
    for result, message in results:
        assert result.exit_code == 1, result.output
        assert message in result.output and "Traceback" not in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "x.png").exists()
