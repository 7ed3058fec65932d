"""Video as keyframe tokens plus learned in-betweens: a clip costs the language model 1/k of its frames.

Every k-th frame is written as image-tokenizer tokens; the frames between two keyframes are made by
the `KeyframeInterpolator` in the tokenizer's code space (the FSQ grid values, (d, h, w) per frame),
snapped back to the nearest code (so they are tokens too) and decoded. The image tokenizer is fully
convolutional, so one trained on 28 px digits tokenizes a 64 px Moving-MNIST canvas with the same
weights (`at_size`). `keyframe_experiment` measures in-between frames against the truth, against the
tokenizer's own reconstruction of them (the ceiling), and against two baselines: the linear blend of
the keyframes' codes and repeating the previous keyframe.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from omni_media.errors import MediaError
from omni_media.image_tokenizer import ImageTokenizer, psnr
from omni_media.interpolate import InterpolatorConfig, KeyframeInterpolator, TrainConfig, train_interpolator


def at_size(tokenizer: ImageTokenizer, image_size: int) -> ImageTokenizer:
    """The same weights for `image_size` square images (the convolutions do not depend on it)."""
    config = dataclasses.replace(tokenizer.config, image_size=image_size)  # validates divisibility
    out = ImageTokenizer(config)
    out.load_state_dict(tokenizer.state_dict())
    return out.eval()


def tokens_to_codes(tokenizer: ImageTokenizer, tokens: Tensor) -> Tensor:
    """(B, h, w) tokens -> (B, d, h, w) code values in [-1, 1]: the space the interpolator works in."""
    return tokenizer.fsq.codes(tokens).permute(0, 3, 1, 2)


def codes_to_tokens(tokenizer: ImageTokenizer, codes: Tensor) -> Tensor:
    """(B, d, h, w) values -> (B, h, w) tokens of the nearest grid point, channel by channel."""
    return tokenizer.fsq.nearest(codes.permute(0, 2, 3, 1))  # (B, h, w, d) -> (B, h, w)


@torch.no_grad()
def clip_tokens(tokenizer: ImageTokenizer, clips: np.ndarray, batch_size: int = 512) -> Tensor:
    """(N, T, H, W) uint8 grey clips -> (N, T, h, w) tokens, every frame."""
    if clips.dtype != np.uint8 or clips.ndim != 4:
        raise MediaError(f"clips must be uint8 (N, T, H, W), got {clips.dtype} {clips.shape}")
    n, t = clips.shape[:2]
    frames = torch.from_numpy(clips.reshape(n * t, 1, *clips.shape[2:])).float() / 255
    out = [tokenizer.encode(frames[i : i + batch_size]) for i in range(0, len(frames), batch_size)]
    return torch.cat(out).view(n, t, *tokenizer.grid)


@torch.no_grad()
def fill_between(
    tokenizer: ImageTokenizer, interpolator: KeyframeInterpolator | None, keys: Tensor, every: int
) -> Tensor:
    """(N, K, h, w) keyframe tokens -> (N, (K-1)*every + 1, h, w) tokens: the keyframes with `every - 1`
    in-between frames made in each gap (the linear blend of the codes when `interpolator` is None)."""
    n, k = keys.shape[:2]
    codes = tokens_to_codes(tokenizer, keys.flatten(0, 1)).view(n, k, -1, *keys.shape[2:])  # (N, K, d, h, w)
    frames = [keys[:, 0]]
    for i in range(k - 1):
        z0, z1 = codes[:, i], codes[:, i + 1]
        for j in range(1, every):
            t = torch.full((n,), j / every)
            z = z0 + t.view(-1, 1, 1, 1) * (z1 - z0) if interpolator is None else interpolator(z0, z1, t)
            frames.append(codes_to_tokens(tokenizer, z))
        frames.append(keys[:, i + 1])
    return torch.stack(frames, dim=1)


@torch.no_grad()
def decode_clips(tokenizer: ImageTokenizer, tokens: Tensor, batch_size: int = 512) -> np.ndarray:
    """(N, T, h, w) tokens -> (N, T, C, H, W) float frames in [0, 1]."""
    n, t = tokens.shape[:2]
    flat = tokens.flatten(0, 1)
    out = torch.cat([tokenizer.decode(flat[i : i + batch_size]) for i in range(0, len(flat), batch_size)])
    return out.view(n, t, *out.shape[1:]).numpy()


def keyframe_experiment(
    tokenizer: ImageTokenizer,
    train_clips: np.ndarray,
    test_clips: np.ndarray,
    every: int = 4,
    train: TrainConfig | None = None,
    hidden: int = 32,
    on_progress: Callable[[int, float], None] | None = None,
) -> tuple[KeyframeInterpolator, dict[str, float]]:
    """Fit the interpolator on the code-space latents of `train_clips` (N, T, S, S) uint8 and score the
    in-between frames of `test_clips` made from every `every`-th frame (PSNR in dB over those frames)."""
    if every < 2:
        raise MediaError(f"every must be >= 2 (at least one frame between keyframes), got {every}")
    tok = at_size(tokenizer, train_clips.shape[-1])
    t0 = time.monotonic()
    train_tokens = clip_tokens(tok, train_clips)
    n, t = train_tokens.shape[:2]
    latents = tokens_to_codes(tok, train_tokens.flatten(0, 1)).view(n, t, -1, *tok.grid)
    train = train or TrainConfig(steps=600)
    config = dataclasses.replace(train, max_gap=max(train.max_gap, every))
    model = train_interpolator(latents, config, InterpolatorConfig(channels=latents.shape[2], hidden=hidden),
                               on_progress).eval()  # fmt: skip
    train_s = time.monotonic() - t0
    span = (test_clips.shape[1] - 1) // every * every + 1  # whole gaps only
    truth = test_clips[:, :span].astype(np.float32) / 255  # (N, T, S, S)
    tokens = clip_tokens(tok, test_clips[:, :span])
    keys = tokens[:, ::every]
    between = np.array([i % every != 0 for i in range(span)])
    ours = decode_clips(tok, fill_between(tok, model, keys, every))[:, between, 0]
    blend = decode_clips(tok, fill_between(tok, None, keys, every))[:, between, 0]
    ceiling = decode_clips(tok, tokens)[:, between, 0]
    hold = decode_clips(tok, keys.repeat_interleave(every, dim=1)[:, :span])[:, between, 0]
    target = truth[:, between]
    return model, {
        "psnr_interpolator": psnr(ours, target),
        "psnr_linear_blend": psnr(blend, target),
        "psnr_hold_keyframe": psnr(hold, target),
        "psnr_all_frames_tokenized": psnr(ceiling, target),
        "every": float(every),
        "token_fraction": float(keys.shape[1] / span),
        "train_s": train_s,
        "train_clips": float(len(train_clips)),
        "test_clips": float(len(test_clips)),
        "frames": float(span),
    }
