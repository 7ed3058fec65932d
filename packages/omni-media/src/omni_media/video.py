"""Video: reading frames with their sound through PyAV, writing clips, moving-digit clips, a video encoder.

`read_video` demuxes the picture and the sound track in one pass: frames are kept uniformly in time
(the one nearest each 1/fps tick), the sound is resampled by swresample and averaged to mono, and both
sit on the container's clock (`audio[n]` is at n / audio_rate seconds). Every PyAV/FFmpeg failure
becomes one `MediaError` naming the file. `moving_digits` is Moving MNIST (Srivastava et al. 2015,
"Unsupervised Learning of Video Representations using LSTMs"): digits bouncing inside a canvas.
`VideoEncoder` runs a `VisionEncoder` on every frame, optionally averages groups of k frames (as
Qwen2-VL's temporal patches do) and adds a temporal position by frame index or by timestamp.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal

import av
import numpy as np
import torch
from torch import Tensor, nn

from omni_media.errors import MediaError
from omni_media.image import ImageProcessor
from omni_media.vision import VisionEncoder

# What PyAV raises for a bad file: its own FFmpegError tree (some also ValueError or OSError), plus
# IndexError/KeyError from half-parsed containers and RuntimeError from the codec wrappers.
_AV_ERRORS = (av.FFmpegError, OSError, ValueError, LookupError, EOFError, RuntimeError)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


@dataclass(frozen=True)
class Video:
    frames: np.ndarray  # uint8 (T, H, W, 3) RGB
    timestamps: np.ndarray  # float64 (T,) seconds on the container's clock
    audio: np.ndarray | None  # float32 (N,) mono, audio[n] at n / audio_rate s; None: no sound read
    audio_rate: int | None
    source_fps: float | None  # the video stream's average frame rate, if the container says
    duration: float  # seconds, of the whole file

    def __post_init__(self) -> None:
        f = self.frames
        if f.dtype != np.uint8 or f.ndim != 4 or f.shape[3] != 3 or not f.shape[0]:
            raise ValueError(f"frames must be uint8 (T, H, W, 3) with T >= 1, got {f.dtype} {f.shape}")
        if self.timestamps.shape != (f.shape[0],):
            raise ValueError(f"timestamps must have shape ({f.shape[0]},), got {self.timestamps.shape}")
        if (self.audio is None) != (self.audio_rate is None):
            raise ValueError("audio and audio_rate must both be given or both be None")


def _check_positive(value: object, name: str, origin: Path, integer: bool) -> None:
    ok = isinstance(value, int) if integer else isinstance(value, int | float) and math.isfinite(value)
    if isinstance(value, bool) or not ok or value <= 0:
        kind = "integer" if integer else "number"
        raise MediaError(f"{origin}: {name} must be a positive {kind} or None, got {value!r}")


def read_video(
    path: str | Path,
    fps: float | None = None,
    max_frames: int | None = None,
    size: int | None = None,
    audio_rate: int | None = 16000,
) -> Video:
    """Frames (all, or sampled at `fps`; at most `max_frames`; shortest edge resized to `size`) and sound."""
    path = Path(path)
    for value, name, integer in ((fps, "fps", False), (max_frames, "max_frames", True),
                                 (size, "size", True), (audio_rate, "audio_rate", True)):  # fmt: skip
        if value is not None:
            _check_positive(value, name, path, integer)
    if not path.is_file():
        raise MediaError(f"{path}: {'not a file' if path.exists() else 'no such file'}")
    try:
        with av.open(str(path), "r") as container:
            return _read(container, path, fps, max_frames, size, audio_rate)
    except MediaError:
        raise
    except _AV_ERRORS as e:
        raise MediaError(f"{path}: not a readable video: {_one_line(e)}") from None


def _seconds(stream: av.stream.Stream, ticks: int | None) -> float | None:
    return None if ticks is None or stream.time_base is None else float(ticks * stream.time_base)


def _read(
    container: av.container.InputContainer,
    path: Path,
    fps: float | None,
    max_frames: int | None,
    size: int | None,
    audio_rate: int | None,
) -> Video:
    if not len(container.streams):
        raise MediaError(f"{path}: no streams: an empty container or a truncated header")
    if not container.streams.video:
        raise MediaError(f"{path}: no video stream")
    vs = container.streams.video[0]
    vs.thread_type = "AUTO"
    src_fps = float(vs.average_rate or vs.guessed_rate or 0) or None
    astream = container.streams.audio[0] if audio_rate and container.streams.audio else None
    # A target tick takes the first frame within half a source frame of it, i.e. the nearest frame.
    tol = 0.5 / src_fps if src_fps else 1e-6
    step = 1.0 / fps if fps else None
    frames, times, chunks = [], [], []
    t0 = next_t = audio_start = None
    n_decoded, video_done, audio_end = 0, False, math.inf
    resampler = av.AudioResampler(format="fltp", rate=audio_rate) if astream else None  # keeps the layout

    for packet in container.demux(*(s for s in (vs, astream) if s is not None)):
        if packet.stream is vs:
            if video_done:
                continue
            for frame in packet.decode():
                t = frame.time if frame.time is not None else n_decoded / (src_fps or 1.0)
                n_decoded += 1
                if video_done or (next_t is not None and t < next_t - tol):
                    continue
                frames.append(_rgb(frame, size))
                times.append(t)
                if step is not None:
                    t0 = t if t0 is None else t0
                    next_t = t0 + (math.floor((t - t0 + tol) / step) + 1) * step
                if max_frames is not None and len(frames) == max_frames:
                    video_done = True
                    audio_end = t + (step or 1.0 / (src_fps or 1.0))
        else:
            for frame in packet.decode():
                if audio_start is None:
                    audio_start = frame.time or 0.0
                chunks += [f.to_ndarray() for f in resampler.resample(frame)]  # (channels, n) each
        # With max_frames reached, read on only until the sound covers the frames' span.
        audio_done = astream is None or (
            audio_start is not None and _covered(chunks, audio_start, audio_rate) > audio_end
        )
        if video_done and audio_done:
            break
    if not frames:
        raise MediaError(f"{path}: the video stream has no decodable frames")

    duration = container.duration / av.time_base if container.duration else None
    start, length = _seconds(vs, vs.start_time), _seconds(vs, vs.duration)
    # Truncated: fewer frames than the index promises, and the last one well short of the stream's end.
    promised = not video_done and src_fps and vs.frames and start is not None and length
    if promised and n_decoded < vs.frames and times[-1] < start + length - 1.5 / src_fps:
        raise MediaError(
            f"{path}: truncated: {n_decoded} of {vs.frames} frames decode, the last at {times[-1]:.2f} s"
        )
    duration = duration or (times[-1] + 1.0 / (src_fps or 1.0))
    audio = None
    if astream is not None:
        chunks += [f.to_ndarray() for f in resampler.resample(None)]
        audio = _place_audio(
            chunks, audio_start or 0.0, audio_rate, min(audio_end, _stream_end(astream, duration))
        )
    return Video(np.stack(frames), np.asarray(times, np.float64), audio, audio_rate if astream else None,
                 src_fps, float(duration))  # fmt: skip


def _rgb(frame: av.VideoFrame, size: int | None) -> np.ndarray:
    if size is None:
        return frame.to_ndarray(format="rgb24")
    w, h = frame.width, frame.height
    scale = size / min(w, h)
    return frame.to_ndarray(format="rgb24", width=max(1, round(w * scale)), height=max(1, round(h * scale)),
                            interpolation="AREA")  # fmt: skip


def _covered(chunks: list[np.ndarray], start: float, rate: int) -> float:
    return start + sum(c.shape[1] for c in chunks) / rate


def _stream_end(stream: av.stream.Stream, fallback: float) -> float:
    start, length = _seconds(stream, stream.start_time), _seconds(stream, stream.duration)
    return (start or 0.0) + length if length else fallback


def _place_audio(chunks: list[np.ndarray], start: float, rate: int, end: float) -> np.ndarray:
    """Channels averaged (swresample's stereo-to-mono would add them at 1/sqrt(2), 3 dB louder), then
    shifted so index 0 is time 0 and cut at `end` (AAC decoders pad the last frame past the stream)."""
    x = np.concatenate(chunks, axis=1).mean(axis=0) if chunks else np.zeros(0, np.float32)
    shift = round(start * rate)
    x = np.concatenate([np.zeros(shift, np.float32), x]) if shift > 0 else x[-shift:]
    return np.ascontiguousarray(x[: max(0, round(end * rate))], dtype=np.float32)


# ---------------------------------------------------------------------------------------------------- write


def write_video(
    path: str | Path,
    frames: np.ndarray,
    fps: float,
    audio: np.ndarray | None = None,
    audio_rate: int = 16000,
    codec: str | None = None,
) -> Path:
    """uint8 (T, H, W, 3) or grey (T, H, W) frames, with an optional mono sound track, written atomically."""
    path = Path(path)
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or not (
        frames.ndim == 3 or (frames.ndim == 4 and frames.shape[3] == 3)) or not frames.shape[0]:  # fmt: skip
        got = f"{frames.dtype} {frames.shape}" if isinstance(frames, np.ndarray) else type(frames).__name__
        raise MediaError(f"{path}: frames must be uint8 (T, H, W, 3) or (T, H, W) with T >= 1, got {got}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise MediaError(f"{path}: height and width must be even for 4:2:0 video, got {frames.shape[1:3]}")
    _check_positive(fps, "fps", path, integer=False)
    _check_positive(audio_rate, "audio_rate", path, integer=True)
    if audio is not None:
        audio = np.asarray(audio)
        if audio.ndim != 1 or audio.dtype.kind != "f" or not np.isfinite(audio).all():
            raise MediaError(f"{path}: audio must be finite float (N,) mono, got {audio.dtype} {audio.shape}")
    codec = codec or ("libx264" if "libx264" in av.codecs_available else "mpeg4")
    if codec not in av.codecs_available:
        raise MediaError(f"{path}: codec {codec!r} is not in this FFmpeg build")
    if frames.ndim == 3:
        frames = np.repeat(frames[..., None], 3, axis=3)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder, so os.replace is a rename; same suffix, so FFmpeg picks the container from it.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        _write(tmp, frames, fps, audio, audio_rate, codec)
        os.replace(tmp, path)
    except _AV_ERRORS as e:
        raise MediaError(f"{path}: cannot write video: {_one_line(e)}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _write(
    tmp: str, frames: np.ndarray, fps: float, audio: np.ndarray | None, audio_rate: int, codec: str
) -> None:
    _, H, W, _ = frames.shape
    # faststart puts the index before the data, so a player (or read_video) can start on a partial file.
    options = {"movflags": "+faststart"} if Path(tmp).suffix.lower() in (".mp4", ".mov", ".m4v") else {}
    with av.open(tmp, "w", options=options) as out:
        vs = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        vs.width, vs.height, vs.pix_fmt = W, H, "yuv420p"
        if codec == "libx264":
            vs.options = {"crf": "18"}  # visually lossless; tests compare pixels after the round trip
        else:
            vs.bit_rate = max(200_000, int(W * H * fps))  # ~1 bit per pixel: mpeg4 at high quality
        ast = out.add_stream("aac", rate=audio_rate, layout="mono") if audio is not None else None
        for f in frames:
            out.mux(vs.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(vs.encode())
        if ast is not None and len(audio):
            frame = av.AudioFrame.from_ndarray(audio.astype(np.float32)[None], format="flt", layout="mono")
            frame.sample_rate, frame.pts = audio_rate, 0
            out.mux(ast.encode(frame))  # PyAV cuts it into the encoder's 1024-sample frames
            out.mux(ast.encode())


# ---------------------------------------------------------------------------------------------------- digits


@dataclass(frozen=True)
class MovingDigits:
    clips: np.ndarray  # uint8 (N, T, S, S)
    positions: np.ndarray  # float32 (N, T, D, 2): each digit's top-left (y, x) in pixels
    bounces: np.ndarray  # bool (N, T, D): the digit hit a wall on the step into frame t
    digits: np.ndarray  # int64 (N, D): which of `images` each digit is


def moving_digits(
    images: np.ndarray,
    n_clips: int,
    frames: int,
    size: int = 64,
    n_digits: int = 2,
    speed: float = 3.0,
    seed: int = 0,
) -> MovingDigits:
    """Digits drifting at `speed` px/frame in a random direction, bouncing off the canvas edges."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 3 or not len(images):
        raise MediaError(
            f"images must be uint8 (N, h, w) with N >= 1, got {getattr(images, 'shape', images)}"
        )
    h, w = images.shape[1:]
    for value, name in ((n_clips, "n_clips"), (frames, "frames"), (n_digits, "n_digits")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MediaError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(size, int) or size < max(h, w):
        raise MediaError(f"size must be an integer >= the digit size {max(h, w)}, got {size!r}")
    if not (isinstance(speed, int | float) and math.isfinite(speed) and speed >= 0):
        raise MediaError(f"speed must be a finite number >= 0, got {speed!r}")
    rng = np.random.default_rng(seed)
    lim = np.array([size - h, size - w], np.float64)  # (2,) largest top-left coordinate
    digits = rng.integers(0, len(images), (n_clips, n_digits))
    pos = rng.uniform(0, 1, (n_clips, n_digits, 2)) * lim  # (N, D, 2)
    angle = rng.uniform(0, 2 * np.pi, (n_clips, n_digits))
    vel = speed * np.stack([np.sin(angle), np.cos(angle)], axis=-1)  # (N, D, 2)
    positions = np.zeros((n_clips, frames, n_digits, 2), np.float32)
    bounces = np.zeros((n_clips, frames, n_digits), bool)
    for t in range(frames):
        if t:
            pos = pos + vel
            low, high = pos < 0, pos > lim
            pos = np.where(low, -pos, np.where(high, 2 * lim - pos, pos))  # mirror back inside
            vel = np.where(low | high, -vel, vel)
            bounces[:, t] = (low | high).any(axis=-1)
        positions[:, t] = pos
    clips = np.zeros((n_clips, frames, size, size), np.uint8)
    corners = np.rint(positions).astype(np.int64)
    for n in range(n_clips):
        for t in range(frames):
            for d in range(n_digits):
                y, x = corners[n, t, d]
                view = clips[n, t, y : y + h, x : x + w]
                np.maximum(view, images[digits[n, d]], out=view)  # overlapping digits: the brighter wins
    return MovingDigits(clips, positions, bounces, digits.astype(np.int64))


def write_moving_digit_clips(
    folder: str | Path,
    images: np.ndarray,
    n_clips: int,
    frames: int,
    fps: float = 10.0,
    size: int = 64,
    n_digits: int = 2,
    seed: int = 0,
    audio: Literal["none", "tone", "clicks"] = "clicks",
    audio_rate: int = 16000,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """`clip_00000.mp4`... of `moving_digits(..., seed)`; the sound is a 440 Hz tone or a click per bounce."""
    if audio not in ("none", "tone", "clicks"):
        raise MediaError(f"audio must be 'none', 'tone' or 'clicks', got {audio!r}")
    data = moving_digits(images, n_clips, frames, size, n_digits, seed=seed)
    n_samples = round(frames / fps * audio_rate)
    t = np.arange(n_samples) / audio_rate
    paths = []
    for i, clip in enumerate(data.clips):
        sound = None
        if audio == "tone":
            sound = 0.3 * np.sin(2 * np.pi * 440.0 * t)
        elif audio == "clicks":
            # A 2 kHz ping decaying over ~10 ms at each frame where some digit bounced.
            sound = np.zeros(n_samples)
            ping = np.sin(2 * np.pi * 2000.0 * t[: audio_rate // 20]) * np.exp(-t[: audio_rate // 20] / 0.01)
            for f in np.flatnonzero(data.bounces[i].any(axis=-1)):
                at = round(f / fps * audio_rate)
                piece = ping[: max(0, n_samples - at)]
                sound[at : at + len(piece)] += 0.5 * piece
        paths.append(write_video(Path(folder) / f"clip_{i:05d}.mp4", clip, fps,
                                 None if sound is None else sound.astype(np.float32), audio_rate))  # fmt: skip
        if on_progress:
            on_progress(i + 1, n_clips)
    return paths


# ---------------------------------------------------------------------------------------------------- encoder


def video_pixels(video: Video | np.ndarray, processor: ImageProcessor) -> Tensor:
    """A `Video` (or uint8 (T, H, W, 3) frames) -> (T, 3, S, S) float32, as the vision encoder expects."""
    frames = video.frames if isinstance(video, Video) else video
    if not isinstance(frames, np.ndarray) or frames.ndim != 4 or not len(frames):
        raise MediaError(f"frames must be (T, H, W, 3) with T >= 1, got {getattr(frames, 'shape', frames)}")
    return processor(list(frames))


@dataclass(frozen=True)
class VideoEncoderConfig:
    temporal: Literal["learned", "sinusoidal", "none"] = "sinusoidal"
    position_by: Literal["index", "time"] = "index"  # time: timestamps (s) * positions_per_second
    positions_per_second: float = 2.0
    max_positions: int = 64  # learned table length; later positions reuse the last row
    pool: int = 1  # average each group of `pool` consecutive frames

    def __post_init__(self) -> None:
        if self.temporal not in ("learned", "sinusoidal", "none"):
            raise ValueError(f"temporal must be 'learned', 'sinusoidal' or 'none', got {self.temporal!r}")
        if self.position_by not in ("index", "time"):
            raise ValueError(f"position_by must be 'index' or 'time', got {self.position_by!r}")
        if not (math.isfinite(self.positions_per_second) and self.positions_per_second > 0):
            raise ValueError(f"positions_per_second must be positive, got {self.positions_per_second}")
        if self.max_positions < 1:
            raise ValueError(f"max_positions must be positive, got {self.max_positions}")
        if self.pool < 1:
            raise ValueError(f"pool must be positive, got {self.pool}")


def sinusoidal(positions: Tensor, dim: int) -> Tensor:
    """(...,) real positions -> (..., dim) sin/cos features (Vaswani et al. 2017), frequencies 1 .. 1e-4."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=positions.device) / max(half, 1))
    angles = positions.float()[..., None] * freqs  # (..., half)
    out = torch.cat([angles.sin(), angles.cos()], dim=-1)
    return torch.nn.functional.pad(out, (0, dim - 2 * half))  # an odd dim gets one zero feature


class VideoEncoder(nn.Module):
    """Per-frame vision features with temporal positions: (B, T, C, H, W) -> (B, T', N, D), T' = ceil(T/pool)."""

    def __init__(self, vision: VisionEncoder, config: VideoEncoderConfig = VideoEncoderConfig()):
        super().__init__()
        self.vision, self.config = vision, config
        if config.temporal == "learned":
            self.temporal_embedding = nn.Parameter(
                torch.randn(config.max_positions, vision.cfg.hidden_size) * 0.02
            )

    def positions(self, B: int, T: int, timestamps: Tensor | None, device: torch.device) -> Tensor:
        """(B, T) real-valued temporal positions of the frames."""
        if self.config.position_by == "index":
            return torch.arange(T, device=device, dtype=torch.float32).expand(B, T)
        if timestamps is None or timestamps.shape != (B, T):
            got = None if timestamps is None else tuple(timestamps.shape)
            raise ValueError(f"position_by='time' needs timestamps of shape ({B}, {T}), got {got}")
        return timestamps.to(device, torch.float32) * self.config.positions_per_second

    def embed(self, pos: Tensor) -> Tensor:
        """(B, T') positions -> (B, T', D); learned rows are blended linearly between integer positions."""
        D = self.vision.cfg.hidden_size
        if self.config.temporal == "sinusoidal":
            return sinusoidal(pos, D)
        table = self.temporal_embedding
        pos = pos.clamp(0, table.shape[0] - 1)
        lo = pos.floor().long()
        hi = (lo + 1).clamp(max=table.shape[0] - 1)
        frac = (pos - lo)[..., None]
        return table[lo] * (1 - frac) + table[hi] * frac

    def forward(
        self, pixel_values: Tensor, timestamps: Tensor | None = None, interpolate_pos_encoding: bool = False
    ) -> Tensor:
        """(B, T, C, H, W) normalised pixels (and (B, T) seconds for position_by='time') -> (B, T', N, D)."""
        B, T = pixel_values.shape[:2]
        x = self.vision(pixel_values.flatten(0, 1), interpolate_pos_encoding).last_hidden_state  # (B*T, N, D)
        x = x.view(B, T, *x.shape[1:])  # (B, T, N, D)
        pos = self.positions(B, T, timestamps, x.device)  # (B, T)
        k = self.config.pool
        if k > 1:
            pad = -T % k  # a short last group repeats its last frame, as Qwen2-VL pads to its temporal patch
            if pad:
                x = torch.cat([x, x[:, -1:].expand(B, pad, *x.shape[2:])], dim=1)
                pos = torch.cat([pos, pos[:, -1:].expand(B, pad)], dim=1)
            x = x.view(B, -1, k, *x.shape[2:]).mean(dim=2)  # (B, T', N, D)
            pos = pos.view(B, -1, k).mean(dim=2)  # (B, T'): a group sits at its frames' mean position
        if self.config.temporal == "none":
            return x
        return x + self.embed(pos).to(x.dtype)[:, :, None]  # same position for every patch of a frame
