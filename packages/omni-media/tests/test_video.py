"""omni_media.video: a write/read round trip with sound, fps sampling, the files that must be refused,
moving digits, and the video encoder's shapes, pooling and temporal positions."""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch

from omni_media.errors import MediaError
from omni_media.image import ImageProcessor
from omni_media.video import (
    Video,
    VideoEncoder,
    VideoEncoderConfig,
    moving_digits,
    read_video,
    video_pixels,
    write_moving_digit_clips,
    write_video,
)
from omni_media.vision import VisionConfig, VisionEncoder

SR = 16000
T, H, W, FPS = 20, 48, 64, 10


def _square_frames() -> np.ndarray:
    """A bright 12x12 square moving 2 px right per frame on a dark background."""
    frames = np.full((T, H, W, 3), 16, np.uint8)
    for t in range(T):
        frames[t, 10:22, 2 * t + 4 : 2 * t + 16] = 240
    return frames


def _square_x(frame: np.ndarray) -> float:
    """Column of the square's left edge: the first column brighter than half-way (robust to ringing)."""
    cols = frame.mean(axis=(0, 2))
    return float(np.argmax(cols > (cols.min() + cols.max()) / 2))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "square.mp4"
    tone = (0.5 * np.sin(2 * np.pi * 440.0 * np.arange(2 * SR) / SR)).astype(np.float32)  # 2 s = T / FPS
    return write_video(path, _square_frames(), FPS, audio=tone, audio_rate=SR)


def test_round_trip_frames_and_sound(clip):
    v = read_video(clip)
    assert v.frames.shape == (T, H, W, 3) and v.frames.dtype == np.uint8
    np.testing.assert_allclose(v.timestamps, np.arange(T) / FPS, atol=1e-6)
    assert v.source_fps == pytest.approx(FPS) and v.duration == pytest.approx(T / FPS, abs=0.05)
    written = _square_frames()
    assert np.abs(v.frames.astype(int) - written).mean() < 3  # lossy, but crf 18 is close
    assert [_square_x(f) for f in v.frames] == [2 * t + 4 for t in range(T)]
    assert v.audio_rate == SR and v.audio.dtype == np.float32
    assert abs(len(v.audio) - 2 * SR) <= SR // 100  # 2 s, within 10 ms
    spectrum = np.abs(np.fft.rfft(v.audio * np.hanning(len(v.audio))))
    assert np.argmax(spectrum) * SR / len(v.audio) == pytest.approx(440.0, abs=2.0)
    assert np.sqrt(np.mean(v.audio[SR // 10 : -SR // 10] ** 2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.05)


def test_fps_sampling_max_frames_size_and_audio_rate(clip):
    v = read_video(clip, fps=2.5)  # every 4th source frame
    np.testing.assert_allclose(v.timestamps, np.arange(0, T, 4) / FPS, atol=1e-6)
    assert [_square_x(f) for f in v.frames] == [2 * t + 4 for t in range(0, T, 4)]
    v = read_video(clip, fps=5, max_frames=3, size=24, audio_rate=8000)
    assert v.frames.shape == (3, 24, 32, 3)  # shortest edge 48 -> 24, aspect kept
    np.testing.assert_allclose(v.timestamps, [0.0, 0.2, 0.4], atol=1e-6)
    assert v.audio_rate == 8000 and len(v.audio) == pytest.approx(0.6 * 8000, abs=8)  # up to the 4th tick
    assert len(read_video(clip, fps=100).frames) == T  # never more frames than the file has
    v = read_video(clip, audio_rate=None)
    assert v.audio is None and v.audio_rate is None


def test_video_without_sound_and_mpeg4(tmp_path):
    path = write_video(tmp_path / "quiet.mp4", _square_frames()[..., 0], FPS, codec="mpeg4")  # grey input
    v = read_video(path)
    assert v.audio is None and v.frames.shape == (T, H, W, 3)
    assert [_square_x(f) for f in v.frames] == [2 * t + 4 for t in range(T)]
    assert [p.name for p in tmp_path.iterdir()] == ["quiet.mp4"]  # the temp file is gone


def test_refused_files(tmp_path, clip):
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n")
    with pytest.raises(MediaError, match=r"notes\.mp4: not a readable video"):
        read_video(text)
    with pytest.raises(MediaError, match=r"missing\.mp4: no such file"):
        read_video(tmp_path / "missing.mp4")
    data = clip.read_bytes()
    for frac in (0.05, 0.5, 0.9):
        cut = tmp_path / f"cut{frac}.mp4"
        cut.write_bytes(data[: int(len(data) * frac)])
        with pytest.raises(MediaError, match=rf"cut{frac}\.mp4: "):
            read_video(cut)
    # Without the sound the decoder sees no error: the missing frames are what give it away.
    with pytest.raises(MediaError, match=r"cut0.5.mp4: truncated: \d+ of 20 frames"):
        read_video(tmp_path / "cut0.5.mp4", audio_rate=None)

    sound = tmp_path / "sound.mp4"  # an mp4 holding only an AAC track
    with av.open(str(sound), "w") as out:
        stream = out.add_stream("aac", rate=SR, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, SR), np.float32), format="flt", layout="mono")
        frame.sample_rate, frame.pts = SR, 0
        out.mux(stream.encode(frame))
        out.mux(stream.encode())
    with pytest.raises(MediaError, match=r"sound\.mp4: no video stream"):
        read_video(sound)


@pytest.mark.parametrize(
    "kwargs, field",
    [({"fps": 0}, "fps"), ({"fps": float("nan")}, "fps"), ({"max_frames": 2.5}, "max_frames"),
     ({"size": True}, "size"), ({"audio_rate": -1}, "audio_rate")],
)  # fmt: skip
def test_bad_read_arguments(clip, kwargs, field):
    with pytest.raises(MediaError, match=rf"square\.mp4: {field} must be"):
        read_video(clip, **kwargs)


def test_bad_write_arguments(tmp_path):
    ok = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(MediaError, match=r"a\.mp4: height and width must be even"):
        write_video(tmp_path / "a.mp4", np.zeros((2, 7, 8, 3), np.uint8), 10)
    with pytest.raises(MediaError, match=r"a\.mp4: frames must be uint8"):
        write_video(tmp_path / "a.mp4", ok.astype(np.float32), 10)
    with pytest.raises(MediaError, match=r"a\.mp4: fps must be"):
        write_video(tmp_path / "a.mp4", ok, 0)
    with pytest.raises(MediaError, match=r"a\.mp4: audio must be"):
        write_video(tmp_path / "a.mp4", ok, 10, audio=np.zeros((2, 100), np.float32))
    with pytest.raises(MediaError, match=r"a\.mp4: codec 'nope'"):
        write_video(tmp_path / "a.mp4", ok, 10, codec="nope")
    with pytest.raises(MediaError, match=r"a\.xyz: cannot write video"):
        write_video(tmp_path / "a.xyz", ok, 10)
    assert list(tmp_path.iterdir()) == []  # nothing half-written is left behind


# ---------------------------------------------------------------------------------------------------- digits


def _digits(n: int = 6) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.random((n, 28, 28)) * 255).astype(np.uint8) | 1  # every pixel lit: the bbox is the digit


def test_moving_digits_stay_inside_and_are_deterministic():
    images = _digits()
    a = moving_digits(images, n_clips=5, frames=40, size=48, n_digits=2, speed=4.0, seed=3)
    assert a.clips.shape == (5, 40, 48, 48) and a.clips.dtype == np.uint8
    assert a.positions.min() >= 0 and a.positions.max() <= 48 - 28
    assert a.bounces.any()  # 40 frames at 4 px/frame in a 20 px range must hit walls
    steps = np.linalg.norm(np.diff(a.positions, axis=1), axis=-1)  # (N, T-1, D)
    assert np.allclose(steps[~a.bounces[:, 1:]], 4.0, atol=1e-3)  # free flight keeps the speed
    # Frame content is where the trajectory says: each digit's pixels sit at its rounded corner.
    n, t, d = 2, 17, 0
    y, x = np.rint(a.positions[n, t, d]).astype(int)
    assert (a.clips[n, t, y : y + 28, x : x + 28] >= images[a.digits[n, d]]).all()
    b = moving_digits(images, n_clips=5, frames=40, size=48, n_digits=2, speed=4.0, seed=3)
    c = moving_digits(images, n_clips=5, frames=40, size=48, n_digits=2, speed=4.0, seed=4)
    assert np.array_equal(a.clips, b.clips) and not np.array_equal(a.clips, c.clips)
    with pytest.raises(MediaError, match="size must be"):
        moving_digits(images, 1, 4, size=20)
    with pytest.raises(MediaError, match="n_clips must be"):
        moving_digits(images, 0, 4)


def test_write_moving_digit_clips_with_clicks(tmp_path):
    paths = write_moving_digit_clips(tmp_path, _digits(), n_clips=2, frames=20, fps=10, size=48,
                                     n_digits=1, seed=1, audio="clicks")  # fmt: skip
    assert [p.name for p in paths] == ["clip_00000.mp4", "clip_00001.mp4"]
    data = moving_digits(_digits(), 2, 20, 48, 1, seed=1)
    v = read_video(paths[0])
    assert v.frames.shape == (20, 48, 48, 3)
    assert np.abs(v.frames[..., 0].astype(int) - data.clips[0]).mean() < 12  # noise digits code poorly
    # Sound where a bounce happened, silence in frames without one.
    loud = [np.abs(v.audio[round(f / 10 * SR) : round(f / 10 * SR) + 400]).max() for f in range(20)]
    bounced = data.bounces[0].any(axis=-1)
    assert bounced.any() and not bounced.all()
    assert min(np.array(loud)[bounced]) > 0.2 and max(np.array(loud)[~bounced & ~np.roll(bounced, 1)]) < 0.1


# ---------------------------------------------------------------------------------------------------- encoder


def _vision(kind: str = "siglip") -> VisionEncoder:
    cfg = VisionConfig(kind=kind, image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_layers=2,
                       num_heads=4, intermediate_size=64, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
                       use_head=False)  # fmt: skip
    torch.manual_seed(0)
    return VisionEncoder(cfg).eval()


@pytest.mark.parametrize("kind, n_tokens", [("siglip", 16), ("clip", 17)])
def test_video_encoder_shapes_and_pooling(kind, n_tokens):
    vision = _vision(kind)
    x = torch.randn(2, 5, 3, 32, 32)
    with torch.no_grad():
        y = VideoEncoder(vision, VideoEncoderConfig(temporal="none"))(x)
        assert y.shape == (2, 5, n_tokens, 32)
        # Per frame, it is exactly the vision encoder.
        torch.testing.assert_close(y[1, 3], vision(x[1, 3:4]).last_hidden_state[0])
        pooled = VideoEncoder(vision, VideoEncoderConfig(temporal="none", pool=2))(x)
        assert pooled.shape == (2, 3, n_tokens, 32)  # 5 frames -> groups (0,1), (2,3), (4,4)
        torch.testing.assert_close(pooled[:, 0], y[:, :2].mean(1))
        torch.testing.assert_close(pooled[:, 2], y[:, 4])


def test_temporal_positions_change_the_output():
    vision = _vision()
    same = torch.randn(1, 3, 32, 32).expand(4, 3, 32, 32)[None]  # (1, 4, 3, 32, 32): one frame 4 times
    with torch.no_grad():
        for cfg in (VideoEncoderConfig(temporal="sinusoidal"), VideoEncoderConfig(temporal="learned")):
            y = VideoEncoder(vision, cfg)(same)
            assert (y[0, 1:] - y[0, :1]).abs().amax() > 1e-3  # identical frames, different positions
        enc = VideoEncoder(vision, VideoEncoderConfig(position_by="time", positions_per_second=2.0))
        a = enc(same, torch.tensor([[0.0, 0.5, 1.0, 1.5]]))
        b = enc(same, torch.tensor([[0.0, 1.0, 2.0, 3.0]]))
        torch.testing.assert_close(a[0, 0], b[0, 0])
        torch.testing.assert_close(a[0, 2], b[0, 1])  # 1.0 s is position 2 in both
        assert (a[0, 3] - b[0, 3]).abs().amax() > 1e-3
        with pytest.raises(ValueError, match="needs timestamps"):
            enc(same)
    with pytest.raises(ValueError, match="pool must be positive"):
        VideoEncoderConfig(pool=0)


def test_video_pixels_feed_the_encoder(clip):
    v = read_video(clip, fps=5)
    processor = ImageProcessor.for_config("siglip", 32)
    pixels = video_pixels(v, processor)
    assert pixels.shape == (len(v.frames), 3, 32, 32) and pixels.dtype == torch.float32
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    enc = VideoEncoder(_vision(), VideoEncoderConfig(position_by="time"))
    with torch.no_grad():
        out = enc(pixels[None], torch.from_numpy(v.timestamps)[None])
    assert out.shape == (1, len(v.frames), 16, 32) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="frames must be uint8"):
        Video(np.zeros((0, 4, 4, 3), np.uint8), np.zeros(0), None, None, None, 0.0)
