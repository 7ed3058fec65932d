"""Media graphs to ONNX and back through omni_runtime.media: parity with PyTorch within 1e-3, the
manifest, a torch-free runtime process, and the folders and inputs that must be refused."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from omni_export.errors import ExportError
from omni_export.media import (
    MediaGraph,
    codec_graphs,
    export_media,
    image_tokenizer_graphs,
    interpolator_graph,
    video_graph,
    vision_graph,
    whisper_graph,
)
from omni_media.audio import MelConfig, log_mel_batch
from omni_media.codec import AudioCodec, CodecConfig
from omni_media.image import ImageProcessor
from omni_media.image_tokenizer import ImageTokenizer, ImageTokenizerConfig
from omni_media.interpolate import InterpolatorConfig, KeyframeInterpolator
from omni_media.projector import Projector, ProjectorConfig
from omni_media.video import VideoEncoder, VideoEncoderConfig
from omni_media.vision import VisionConfig, VisionEncoder
from omni_media.whisper import WhisperEncoder, WhisperEncoderConfig
from omni_runtime.engine import EngineError
from omni_runtime.media import MediaRuntime

pytestmark = pytest.mark.export


def _vision() -> tuple[VisionEncoder, Projector]:
    torch.manual_seed(0)
    cfg = VisionConfig(kind="siglip", image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_layers=2,
                       num_heads=4, intermediate_size=64, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
                       use_head=True)  # fmt: skip
    enc = VisionEncoder(cfg).eval()
    for (
        p
    ) in enc.parameters():  # the module's own init leaves some weights at zero; parity needs them all live
        torch.nn.init.normal_(p, std=0.2)
    return enc, Projector(ProjectorConfig(in_dim=32, out_dim=24, merge=2)).eval()


def _whisper() -> WhisperEncoder:
    torch.manual_seed(1)
    enc = WhisperEncoder(WhisperEncoderConfig(80, 32, 2, 4, 64, 50)).eval()
    for p in enc.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return enc


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    vision, projector = _vision()
    whisper = _whisper()
    folder = tmp_path_factory.mktemp("media") / "out"
    steps = []
    video = VideoEncoder(vision, VideoEncoderConfig(temporal="sinusoidal", pool=2)).eval()
    interp = KeyframeInterpolator(InterpolatorConfig(channels=4, hidden=16)).eval()
    for p in interp.out.parameters():  # it starts as the plain blend; make the learned part count
        torch.nn.init.normal_(p, std=0.1)
    graphs = [vision_graph(vision, projector), whisper_graph(whisper, seconds=1), video_graph(video, frames=4),
              interpolator_graph(interp, (6, 6))]  # fmt: skip
    manifest = export_media(graphs, folder, on_progress=steps.append)
    return folder, manifest, vision, projector, whisper, steps, video, interp


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [
        rng.integers(0, 256, (40, 50, 3), dtype=np.uint8),
        rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
    ]


def test_manifest_records_each_graph(exported):
    folder, manifest, *_, steps, _, _ = exported
    assert steps == ["exporting vision", "exporting audio", "exporting video", "exporting interpolator"]
    assert all(g["parity_max_abs"] <= 1e-3 for g in manifest["graphs"].values())
    assert json.loads((folder / "media.json").read_text()) == manifest
    v = manifest["graphs"]["vision"]
    assert v["outputs"] == ["features", "pooled"] and v["parity_max_abs"] <= 1e-3
    assert v["inputs"]["pixel_values"]["dynamic"] == {"0": "batch"}
    assert v["bytes"] == (folder / "vision.onnx").stat().st_size
    assert manifest["graphs"]["audio"]["meta"]["mel"]["chunk_seconds"] == 1


def test_runtime_matches_pytorch(exported):
    folder, _, vision, projector, whisper, _, video, interp = exported
    rt = MediaRuntime(folder)
    images = _images()
    got = rt.encode_image(images)  # batch of 2 at export, 2 here; 3 below exercises the dynamic axis
    with torch.no_grad():
        want = projector(vision(ImageProcessor.for_config("siglip", 32)(images)).last_hidden_state).numpy()
    assert got.shape == (2, 4, 24)
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)
    assert rt.run("vision", np.zeros((3, 3, 32, 32), np.float32))[1].shape == (3, 32)
    t = np.arange(16000) / 16000
    clips = [
        np.sin(2 * np.pi * 440 * t).astype(np.float32),
        np.sin(2 * np.pi * 300 * t[:9000]).astype(np.float32),
    ]
    feats = rt.encode_audio(clips)
    with torch.no_grad():
        want = whisper(torch.from_numpy(log_mel_batch(clips, MelConfig(chunk_seconds=1)))).numpy()
    assert feats.shape == (2, 50, 32)
    np.testing.assert_allclose(feats, want, atol=1e-3, rtol=0)
    clip = np.random.default_rng(1).standard_normal((3, 4, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        want = video(torch.from_numpy(clip)).numpy()
    np.testing.assert_allclose(rt.run("video", clip)[0], want, atol=1e-3, rtol=0)
    assert want.shape == (3, 2, 16, 32)
    z = np.random.default_rng(2).standard_normal((2, 5, 4, 6, 6)).astype(np.float32)
    t = np.array([0.25, 0.5, 0.5, 0.75, 0.1], np.float32)
    with torch.no_grad():
        want = interp(*(torch.from_numpy(a) for a in (z[0], z[1], t))).numpy()
    np.testing.assert_allclose(rt.run("interpolator", z[0], z[1], t)[0], want, atol=1e-3, rtol=0)


def test_runtime_process_never_imports_torch(exported):
    folder = exported[0]
    code = (
        "import sys, numpy as np\n"
        "from omni_runtime.media import MediaRuntime\n"
        f"rt = MediaRuntime({str(folder)!r})\n"
        "f = rt.encode_image([np.zeros((20, 30, 3), np.uint8)])\n"
        "a = rt.encode_audio([np.zeros(8000, np.float32)])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print(f.shape, a.shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["(1,", "4,", "24)", "(1,", "50,", "32)"]


def test_runtime_refuses_altered_or_foreign_folders(exported, tmp_path):
    folder = exported[0]
    rt = MediaRuntime(folder)
    with pytest.raises(EngineError, match="input pixel_values has shape"):
        rt.run("vision", np.zeros((1, 3, 16, 16), np.float32))
    with pytest.raises(EngineError, match="no graph named 'decoder'"):
        rt.run("decoder", np.zeros(1))
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in folder.iterdir():
        copy.joinpath(f.name).write_bytes(f.read_bytes())
    data = bytearray((copy / "audio.onnx").read_bytes())
    data[-10] ^= 0xFF
    (copy / "audio.onnx").write_bytes(bytes(data))
    with pytest.raises(EngineError, match=r"audio\.onnx: sha256 differs"):
        MediaRuntime(copy).encode_audio([np.zeros(8000, np.float32)])
    m = json.loads((copy / "media.json").read_text())
    m["graphs"]["vision"]["file"] = "../vision.onnx"
    (copy / "media.json").write_text(json.dumps(m))
    with pytest.raises(EngineError, match=r"must be an \.onnx file name inside the folder"):
        MediaRuntime(copy)
    (copy / "media.json").write_text("{not json")
    with pytest.raises(EngineError, match="not readable JSON"):
        MediaRuntime(copy)
    with pytest.raises(EngineError, match=r"no media\.json"):
        MediaRuntime(tmp_path)


def test_export_refuses_bad_graphs(tmp_path):
    with pytest.raises(ExportError, match="identifier"):
        MediaGraph("a/b", torch.nn.Identity(), {"x": torch.zeros(1)}, ("y",))
    g = MediaGraph("same", torch.nn.Identity(), {"x": torch.zeros(1)}, ("y",))
    with pytest.raises(ExportError, match="distinct names"):
        export_media([g, g], tmp_path / "x")
    with pytest.raises(ExportError, match="longer than the encoder"):
        whisper_graph(_whisper(), seconds=2)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("not ours")
    with pytest.raises(ExportError, match="not an exported media folder"):
        export_media([g], tmp_path / "mine")
    assert (tmp_path / "mine" / "keep.txt").read_text() == "not ours"


def test_tokenizer_halves_roundtrip_in_the_runtime(tmp_path):
    torch.manual_seed(0)
    tok = ImageTokenizer(ImageTokenizerConfig(widths=(8, 16), levels=(5, 5, 5))).eval()
    codec = AudioCodec(CodecConfig(channels=16, n_blocks=1, levels=(5, 5), n_q=2)).eval()
    manifest = export_media(image_tokenizer_graphs(tok) + codec_graphs(codec, seconds=0.5), tmp_path / "tok")
    assert {g["token_mismatch"] for g in manifest["graphs"].values()} == {0.0}
    assert manifest["graphs"]["image_decoder"]["meta"]["grid"] == [7, 7]
    rt = MediaRuntime(tmp_path / "tok")
    images = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
    tokens = rt.run("image_encoder", images)[0]
    with torch.no_grad():
        assert np.array_equal(tokens, tok.encode(torch.from_numpy(images)).numpy())
        want = tok.decode(torch.from_numpy(tokens)).numpy()
    np.testing.assert_allclose(rt.run("image_decoder", tokens)[0], want, atol=1e-3, rtol=0)
    wave = (0.1 * np.random.default_rng(1).standard_normal((1, 12000))).astype(np.float32)  # another length
    codes = rt.run("audio_encoder", wave)[0]
    with torch.no_grad():
        assert np.array_equal(codes, codec.encode(torch.from_numpy(wave)).numpy())
        want = codec.decode(torch.from_numpy(codes)).numpy()
    assert codes.shape == (1, 2, 38)
    np.testing.assert_allclose(rt.run("audio_decoder", codes)[0], want, atol=1e-3, rtol=0)
    with pytest.raises(EngineError, match=r"token ids outside \[0, 25\)"):
        rt.run("audio_decoder", codes + 25)
