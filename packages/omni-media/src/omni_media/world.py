"""The digit world: every digit as an MNIST image, a spoken word, a written word and a moving clip.

Everything here is made offline from the MNIST wheel and eSpeak NG, and is deterministic for a seed:

- spoken sequences: words of one voice (`SpokenDigits` from `omni_media.speech`), trimmed of their
  silence and joined with short pauses, so "three four" is one waveform as a person would say it;
- word clips for speech output: one word per fixed-length clip, the unit a speech span holds;
- direction clips: one digit crossing a `size` px canvas left, right, up or down in `frames` frames,
  at a random offset across the motion;
- `read_clip`: the judge of a clip. It finds the digit in each frame (the 28 x 28 window centred on the
  ink's centre of mass), reads it with an MNIST classifier, and takes the direction from the track.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from omni_media.errors import MediaError
from omni_media.image import locate
from omni_media.speech import SpokenDigits

DIRECTIONS = ("left", "right", "up", "down")
_STEP = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}  # (dy, dx) per unit of motion
DIGIT = 28  # MNIST side
RATE = 16000


# ---------------------------------------------------------------------------------------------------- speech


def trim(wave: np.ndarray, threshold: float = 0.05, frame: int = 160) -> np.ndarray:
    """`wave` without its leading and trailing silence: frames (10 ms) whose peak is under `threshold`
    times the clip's peak. A clip with no frame above it is returned unchanged."""
    n = len(wave) // frame
    if n == 0:
        return wave
    peaks = np.abs(wave[: n * frame]).reshape(n, frame).max(axis=1)
    loud = np.flatnonzero(peaks >= threshold * max(float(peaks.max()), 1e-9))
    return wave[loud[0] * frame : (loud[-1] + 1) * frame] if len(loud) else wave


def voice_pool(per_voice: int, voices: Sequence[str], seed: int = 0, **kwargs) -> SpokenDigits:
    """`per_voice` clips of every digit in every voice (`spoken_digits` settings in kwargs), so that
    any sequence can be said in any one of the voices."""
    from omni_media.speech import spoken_digits

    if not voices:
        raise MediaError("voice_pool: no voices")
    parts = [
        spoken_digits(per_voice, seed=seed * 7919 + v, voices=(name,), **kwargs)
        for v, name in enumerate(voices)
    ]
    return SpokenDigits(
        tuple(w for p in parts for w in p.waves),
        np.concatenate([p.labels for p in parts]),
        np.concatenate([np.full(len(p), v, np.int64) for v, p in enumerate(parts)]),
        tuple(voices),
    )


def by_voice(words: SpokenDigits) -> dict[tuple[int, int], list[int]]:
    """(voice id, digit) -> indices of the clips of that digit in that voice."""
    out: dict[tuple[int, int], list[int]] = {}
    for i, (v, d) in enumerate(zip(words.voice_ids.tolist(), words.labels.tolist(), strict=True)):
        out.setdefault((v, d), []).append(i)
    return out


def spoken_sequence(
    words: SpokenDigits,
    digits: Sequence[int],
    rng: np.random.Generator,
    index: dict[tuple[int, int], list[int]] | None = None,
    gap_s: tuple[float, float] = (0.08, 0.25),
) -> np.ndarray:
    """One waveform saying `digits` in one voice of `words` (a voice that speaks all of them), the
    trimmed words joined by pauses of `gap_s` seconds with a little of the clips' own noise floor."""
    if not len(digits) or any(not 0 <= d <= 9 for d in digits):
        raise MediaError(f"digits must be a non-empty sequence of 0..9, got {list(digits)!r}")
    index = by_voice(words) if index is None else index
    voices = sorted({v for v, _ in index})
    usable = [v for v in voices if all((v, d) in index for d in digits)]
    if not usable:
        raise MediaError(f"no voice in the word set speaks all of {list(digits)}")
    v = usable[int(rng.integers(len(usable)))]
    parts = [np.zeros(int(rng.integers(800, 2400)), np.float32)]
    for d in digits:
        options = index[(v, d)]
        parts.append(trim(words.waves[options[int(rng.integers(len(options)))]]))
        parts.append(np.zeros(int(RATE * rng.uniform(*gap_s)), np.float32))
    wave = np.concatenate(parts)
    floor = 1e-3 * float(np.abs(wave).max())
    return (wave + floor * rng.standard_normal(len(wave))).astype(np.float32)


def word_clip(wave: np.ndarray, samples: int) -> np.ndarray:
    """A trimmed word padded with silence (or cut) to `samples`, starting 20 ms in."""
    w = trim(wave)[: samples - 320]
    out = np.zeros(samples, np.float32)
    out[320 : 320 + len(w)] = w
    return out


# ---------------------------------------------------------------------------------------------------- video


@dataclass(frozen=True)
class DirectionClips:
    clips: np.ndarray  # uint8 (N, T, S, S)
    labels: np.ndarray  # int64 (N,) the digit
    directions: np.ndarray  # int64 (N,) index into DIRECTIONS
    corners: np.ndarray  # int64 (N, T, 2) the digit's top-left (y, x) per frame


def direction_clips(
    images: np.ndarray,
    labels: np.ndarray,
    directions: np.ndarray,
    size: int = 40,
    frames: int = 9,
    seed: int = 0,
    align: int = 1,
) -> DirectionClips:
    """Clip i: `images[i]` crossing the canvas in `DIRECTIONS[directions[i]]`, from one edge to the
    other in `frames` frames, at a random offset across the motion (a multiple of `align` pixels: with
    an image tokenizer's cell size, a keyframe on the cell grid holds the digit's own codes)."""
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (DIGIT, DIGIT):
        raise MediaError(f"images must be uint8 (N, 28, 28), got {images.dtype} {images.shape}")
    if len(labels) != len(images) or len(directions) != len(images):
        raise MediaError(f"{len(images)} images, {len(labels)} labels, {len(directions)} directions")
    if not isinstance(size, int) or size < DIGIT + 4:
        raise MediaError(f"size must be an integer >= {DIGIT + 4}, got {size!r}")
    if not isinstance(frames, int) or frames < 2:
        raise MediaError(f"frames must be an integer >= 2, got {frames!r}")
    if not isinstance(align, int) or align < 1 or (size - DIGIT) % align:
        raise MediaError(f"align must be a positive integer dividing size - {DIGIT}, got {align!r}")
    directions = np.asarray(directions, np.int64)
    if len(directions) and (directions.min() < 0 or directions.max() >= len(DIRECTIONS)):
        raise MediaError(f"directions must index {DIRECTIONS}")
    rng = np.random.default_rng(seed)
    span = size - DIGIT
    n = len(images)
    across = rng.integers(0, span // align + 1, n) * align
    along = np.rint(np.linspace(0, span, frames)).astype(np.int64)  # (T,)
    corners = np.zeros((n, frames, 2), np.int64)
    clips = np.zeros((n, frames, size, size), np.uint8)
    for i in range(n):
        dy, dx = _STEP[DIRECTIONS[directions[i]]]
        for t in range(frames):
            a = along[t] if (dy + dx) > 0 else span - along[t]  # moving towards + or - along its axis
            y, x = (a, across[i]) if dy else (across[i], a)
            corners[i, t] = (y, x)
            clips[i, t, y : y + DIGIT, x : x + DIGIT] = images[i]
    return DirectionClips(clips, np.asarray(labels, np.int64), directions, corners)


def direction_of(corners: np.ndarray, min_px: float = 3.0) -> int:
    """The index in DIRECTIONS of a (T, 2) track's net motion; -1 if it moved under `min_px`."""
    dy, dx = (corners[-1] - corners[0]).astype(np.float64)
    if max(abs(dy), abs(dx)) < min_px:
        return -1
    if abs(dx) >= abs(dy):
        return DIRECTIONS.index("right" if dx > 0 else "left")
    return DIRECTIONS.index("down" if dy > 0 else "up")


@torch.no_grad()
def read_clip(classifier: torch.nn.Module, frames: np.ndarray | Tensor) -> tuple[np.ndarray, int]:
    """The judge of one clip: (T, S, S) frames (uint8, or float in [0, 1]) -> ((T,) the digit read in
    each frame, the direction index or -1)."""
    f = frames.numpy() if isinstance(frames, Tensor) else np.asarray(frames)
    if f.dtype != np.uint8:
        f = np.clip(np.rint(f.astype(np.float64) * 255), 0, 255).astype(np.uint8)
    corners = locate(f)
    crops = np.stack([f[t, y : y + DIGIT, x : x + DIGIT] for t, (y, x) in enumerate(corners)])
    logits = classifier(torch.from_numpy(crops).float().unsqueeze(1) / 255)
    return logits.argmax(-1).numpy(), direction_of(corners)
