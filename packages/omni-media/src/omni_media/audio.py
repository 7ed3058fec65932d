"""Whisper's audio front end in numpy (no torch, so the ONNX Runtime path can use it): WAV, resampling, log-mel.

`log_mel` reproduces `transformers.WhisperFeatureExtractor`: 16 kHz audio padded or cut to 30 s, a
centred 400-point STFT with a periodic Hann window, the power spectrum through a Slaney mel filter bank,
log10, a floor 8 decades under the loudest bin, then (x + 4) / 4. `read_wav` reads PCM WAV with the
stdlib `wave` module and resamples any other rate with a Kaiser-windowed sinc (below). The encoder that
reads these features is in `omni_media.whisper`.
"""

from __future__ import annotations

import functools
import math
import wave
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from omni_media.errors import MediaError

# ---------------------------------------------------------------------------------------------------- wav


def read_wav(path: str | Path, rate: int = 16000) -> np.ndarray:
    """A PCM WAV file as float32 mono in [-1, 1) at `rate` Hz (channels averaged, resampled if needed)."""
    path = Path(path)
    if not isinstance(rate, int) or isinstance(rate, bool) or rate <= 0:
        raise MediaError(f"{path}: the target rate must be a positive integer, got {rate!r}")
    try:
        with wave.open(str(path), "rb") as f:
            channels, width = f.getnchannels(), f.getsampwidth()
            src_rate, n = f.getframerate(), f.getnframes()
            raw = f.readframes(n)
    except (wave.Error, EOFError, OSError) as e:
        raise MediaError(f"{path}: not a readable PCM WAV file: {' '.join(str(e).split())[:200]}") from None
    if width not in (1, 2, 3, 4):
        raise MediaError(f"{path}: {8 * width}-bit samples are not supported (8, 16, 24 or 32-bit PCM)")
    if channels < 1 or src_rate < 1:
        raise MediaError(f"{path}: header says {channels} channels at {src_rate} Hz")
    if len(raw) < n * channels * width:
        raise MediaError(
            f"{path}: truncated: {len(raw)} bytes of audio where the header promises {n * channels * width}"
        )
    if n == 0:
        raise MediaError(f"{path}: no audio frames")
    x = _pcm_to_float(raw, width).reshape(n, channels).mean(axis=1, dtype=np.float64)
    if src_rate != rate:
        x = resample(x, src_rate, rate)
    return x.astype(np.float32)


def _pcm_to_float(raw: bytes, width: int) -> np.ndarray:
    """Little-endian PCM bytes as float64 in [-1, 1); WAV's 8-bit samples are unsigned, the others signed."""
    if width == 1:
        return (np.frombuffer(raw, np.uint8).astype(np.float64) - 128.0) / 128.0
    if width == 3:  # no numpy int24: put the three bytes in the top of an int32, the shift keeps the sign
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        return ((b[:, 0] << 8) | (b[:, 1] << 16) | (b[:, 2] << 24)).astype(np.float64) / 2.0**31
    return np.frombuffer(raw, f"<i{width}").astype(np.float64) / 2.0 ** (8 * width - 1)


def resample(x: np.ndarray, src_rate: int, dst_rate: int, zero_crossings: int = 16) -> np.ndarray:
    """`x` (1-D) resampled from `src_rate` to `dst_rate` Hz with a polyphase Kaiser-windowed sinc.

    Output sample n sits at input time n * src / dst. With up/down = dst/src in lowest terms that time's
    fractional part takes only `up` values, so one filter per phase is built once and applied by gather.
    The low-pass cuts at 0.95 of the lower Nyquist (Kaiser beta 8.6, `zero_crossings` lobes each side),
    which keeps a tone below it within ~0.1 dB and pushes aliases below about -80 dB.
    """
    if src_rate <= 0 or dst_rate <= 0:
        raise MediaError(f"resample: rates must be positive, got {src_rate} -> {dst_rate}")
    x = np.asarray(x, dtype=np.float64)
    if src_rate == dst_rate:
        return x.copy()
    g = math.gcd(src_rate, dst_rate)
    up, down = dst_rate // g, src_rate // g
    cutoff = 0.95 * min(1.0, up / down)  # as a fraction of the input Nyquist
    half = math.ceil(zero_crossings / cutoff)  # filter half-width in input samples
    offsets = np.arange(-half + 1, half + 1)  # (K,) taps relative to floor(t)
    frac = (np.arange(up) * down % up) / up  # (up,) fractional input time of each phase
    d = offsets[None, :] - frac[:, None]  # (up, K) tap distance from the output time
    beta = 8.6
    window = np.i0(beta * np.sqrt(np.clip(1.0 - (d / half) ** 2, 0.0, None))) / np.i0(beta)
    filters = cutoff * np.sinc(cutoff * d) * window  # (up, K)

    n_out = -(-len(x) * up // down)  # ceil: the output covers the same duration
    padded = np.concatenate([np.zeros(half), x, np.zeros(half + 1)])
    out = np.empty(n_out)
    block = 1 << 15  # bounds the (block, K) gather to a few MB whatever the file length
    for start in range(0, n_out, block):
        n = np.arange(start, min(start + block, n_out))
        base = n * down // up  # floor of each output sample's input time
        idx = base[:, None] + offsets[None, :] + half  # (block, K) into `padded`
        out[start : start + len(n)] = np.einsum("nk,nk->n", padded[idx], filters[n % up])
    return out


# ---------------------------------------------------------------------------------------------------- log-mel


@dataclass(frozen=True)
class MelConfig:
    """Whisper's front end; the defaults are WhisperFeatureExtractor's (use n_mels=128 for large-v3)."""

    n_mels: int = 80
    sample_rate: int = 16000
    n_fft: int = 400
    hop_length: int = 160
    f_min: float = 0.0
    f_max: float = 8000.0
    chunk_seconds: int | None = 30  # pad or cut every clip to this; None keeps each clip's own length

    def __post_init__(self) -> None:
        for name in ("n_mels", "sample_rate", "n_fft", "hop_length"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"MelConfig.{name} must be a positive integer, got {v!r}")
        if not 0.0 <= self.f_min < self.f_max <= self.sample_rate / 2:
            raise ValueError(
                f"MelConfig: need 0 <= f_min < f_max <= sample_rate/2, got {self.f_min}, {self.f_max}"
            )
        c = self.chunk_seconds
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
            raise ValueError(
                f"MelConfig.chunk_seconds must be None or a positive integer, got {self.chunk_seconds!r}"
            )

    @property
    def chunk_samples(self) -> int | None:
        return None if self.chunk_seconds is None else self.chunk_seconds * self.sample_rate

    @property
    def n_frames(self) -> int | None:
        """Frames per chunk: 3000 for 30 s, i.e. what the encoder's 1500 positions expect."""
        return None if self.chunk_samples is None else self.chunk_samples // self.hop_length


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear (3 mels per 200 Hz) below 1 kHz, logarithmic above."""
    lin = 3.0 * f / 200.0
    return np.where(f >= 1000.0, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) * 27.0 / np.log(6.4), lin)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    return np.where(m >= 15.0, 1000.0 * np.exp((m - 15.0) * np.log(6.4) / 27.0), 200.0 * m / 3.0)


@functools.lru_cache(maxsize=8)
def mel_filters(config: MelConfig) -> np.ndarray:
    """(n_fft//2 + 1, n_mels) float64 triangles, equally spaced in mels, area-normalised ("slaney" norm)."""
    mels = np.linspace(
        _hz_to_mel(np.float64(config.f_min)), _hz_to_mel(np.float64(config.f_max)), config.n_mels + 2
    )
    edges = _mel_to_hz(mels)  # (n_mels + 2,) left edge, centre, right edge of each triangle in turn
    bins = np.linspace(0.0, config.sample_rate // 2, config.n_fft // 2 + 1)  # (F,) FFT bin frequencies
    rise = (bins[:, None] - edges[None, :-2]) / np.diff(edges)[None, :-1]  # (F, n_mels)
    fall = (edges[None, 2:] - bins[:, None]) / np.diff(edges)[None, 1:]
    weights = np.maximum(0.0, np.minimum(rise, fall))
    weights *= 2.0 / (edges[2:] - edges[:-2])[None, :]  # equal area, so a band's energy is its mean power
    weights.setflags(write=False)  # shared through the cache
    return weights


def _fit(waveform: np.ndarray, n: int) -> np.ndarray:
    return waveform[:n] if len(waveform) >= n else np.pad(waveform, (0, n - len(waveform)))


def _check_waveform(w: Any, i: int | None = None) -> np.ndarray:
    what = "waveform" if i is None else f"waveform {i}"
    w = np.asarray(w)
    if w.ndim != 1 or w.size == 0 or not np.issubdtype(w.dtype, np.number):
        raise MediaError(f"{what}: expected a non-empty 1-D array of samples, got shape {w.shape} {w.dtype}")
    w = w.astype(np.float32)  # the extractor works in float32 too
    if not np.isfinite(w).all():
        raise MediaError(f"{what}: contains NaN or infinite samples")
    return w


def log_mel_batch(waveforms: Sequence[np.ndarray], config: MelConfig = MelConfig()) -> np.ndarray:
    """(B, n_mels, frames) float32 Whisper features of 16 kHz mono clips, each floored against its own max.

    Every clip is padded with silence or cut to `config.chunk_seconds`; with chunk_seconds None the batch
    is padded to its longest clip, as the extractor's padding="longest" does.
    """
    if len(waveforms) == 0:
        raise MediaError("log_mel_batch: no waveforms")
    ws = [_check_waveform(w, i) for i, w in enumerate(waveforms)]
    n = config.chunk_samples or max(len(w) for w in ws)
    if n <= config.n_fft // 2:  # the centred STFT reflects n_fft/2 samples at each end
        raise MediaError(
            f"log_mel_batch: clips of {n} samples are shorter than the STFT's {config.n_fft // 2 + 1}"
        )
    half = config.n_fft // 2
    x = np.pad(np.stack([_fit(w, n) for w in ws]), ((0, 0), (half, half)), mode="reflect")  # centred STFT
    frames = np.lib.stride_tricks.sliding_window_view(x, config.n_fft, axis=1)[:, :: config.hop_length]
    frames = frames[:, :-1]  # (B, frames, n_fft): Whisper drops the centred STFT's extra last frame
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(config.n_fft) / config.n_fft)  # periodic Hann
    spec = np.fft.rfft(frames * window, axis=-1)  # (B, frames, F)
    power = spec.real**2 + spec.imag**2
    mel = np.einsum("btf,fm->bmt", power, mel_filters(config))  # (B, n_mels, frames)
    log = np.log10(np.maximum(mel, 1e-10))
    # Dynamic range of 80 dB below the clip's own peak: silence padding does not sink to -10.
    log = np.maximum(log, log.max(axis=(1, 2), keepdims=True) - 8.0)
    return ((log + 4.0) / 4.0).astype(np.float32)


def log_mel(waveform: np.ndarray, config: MelConfig = MelConfig()) -> np.ndarray:
    """(n_mels, frames) float32 Whisper features of one 16 kHz mono clip."""
    return log_mel_batch([waveform], config)[0]
