"""Keyframe latent interpolation: predict the latent of an in-between frame from two keyframes' latents.

`KeyframeInterpolator` is a small dilated conv net over [z0, z1, z1 - z0, t] that predicts a correction
to the linear blend (1 - t) z0 + t z1, scaled by 4 t (1 - t): at t = 0 and t = 1 it returns the keyframes
exactly, and with its zero-initialised output layer it starts as the blend, so training only has to
learn what blending gets wrong (motion instead of cross-fading). It is generic over latents (C, h, w)
and its forward has no data-dependent control flow, so `torch.export` traces it for ONNX. Training
samples triplets i < j < k from latent clips, in the spirit of frame interpolation work (Niklaus & Liu
2018, Reda et al. 2022 "FILM"), but in a frame encoder's latent space.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omni_media.checkpoint import read_with_config, save_with_config
from omni_media.errors import MediaError

FORMAT = "omni-media.keyframe-interpolator.v1"


@dataclass(frozen=True)
class InterpolatorConfig:
    channels: int  # C of the latents
    hidden: int = 64
    dilations: tuple[int, ...] = (1, 2, 4, 1)  # one residual 3x3 conv block each; receptive field 17

    def __post_init__(self) -> None:
        for name in ("channels", "hidden"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.hidden % min(8, self.hidden):
            raise ValueError(f"hidden must be a multiple of 8 (or below 8) for GroupNorm, got {self.hidden}")
        if not self.dilations or any(
            isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in self.dilations
        ):
            raise ValueError(
                f"dilations must be a non-empty tuple of positive integers, got {self.dilations!r}"
            )


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32
    lr: float = 2e-3
    seed: int = 0
    max_gap: int = 4  # k - i of the sampled triplets, 2 .. max_gap frames

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if isinstance(self.max_gap, bool) or not isinstance(self.max_gap, int) or self.max_gap < 2:
            raise ValueError(
                f"max_gap must be an integer >= 2 (one frame between the keys), got {self.max_gap!r}"
            )


class ResBlock(nn.Module):
    def __init__(self, hidden: int, dilation: int):
        super().__init__()
        self.norm = nn.GroupNorm(min(8, hidden), hidden)  # 8 groups where hidden allows (it must divide)
        self.conv = nn.Conv2d(hidden, hidden, 3, padding=dilation, dilation=dilation)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(F.silu(self.norm(x)))


class KeyframeInterpolator(nn.Module):
    """(z0, z1) latents (B, C, h, w) and t (B,) in (0, 1) -> the latent at time t, (B, C, h, w)."""

    def __init__(self, config: InterpolatorConfig):
        super().__init__()
        self.config = config
        C, H = config.channels, config.hidden
        self.inp = nn.Conv2d(3 * C + 1, H, 3, padding=1)
        self.blocks = nn.Sequential(*(ResBlock(H, d) for d in config.dilations))
        self.out = nn.Conv2d(H, C, 3, padding=1)
        nn.init.zeros_(self.out.weight)  # starts as the linear blend
        nn.init.zeros_(self.out.bias)
        # Latents arrive at whatever scale their encoder gives; the net sees them divided by this.
        self.register_buffer("scale", torch.ones(()))

    def forward(self, z0: Tensor, z1: Tensor, t: Tensor) -> Tensor:
        tt = t.to(z0.dtype).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        blend = z0 + tt * (z1 - z0)  # (B, C, h, w)
        a, b = z0 / self.scale, z1 / self.scale
        x = torch.cat([a, b, b - a, tt.expand(-1, 1, *z0.shape[2:])], dim=1)  # (B, 3C+1, h, w)
        residual = self.out(F.silu(self.blocks(self.inp(x))))  # (B, C, h, w)
        return blend + 4 * tt * (1 - tt) * residual * self.scale


# ---------------------------------------------------------------------------------------------------- training


def _check_clips(latent_clips: np.ndarray | Tensor, min_frames: int) -> Tensor:
    x = torch.as_tensor(latent_clips)
    if x.ndim != 5 or not x.is_floating_point() or x.shape[0] < 1 or x.shape[1] < min_frames:
        raise MediaError(
            f"latent_clips must be float (N, T, C, h, w) with N >= 1 and T >= {min_frames}, "
            f"got {x.dtype} {tuple(x.shape)}"
        )
    if not torch.isfinite(x).all():
        raise MediaError("latent_clips holds NaN or infinite values")
    return x.float()


def sample_triplets(rng: np.random.Generator, n_clips: int, frames: int, max_gap: int, n: int) -> np.ndarray:
    """(n, 4) int64 rows (clip, i, j, k) with i < j < k, k - i in 2 .. min(max_gap, frames - 1)."""
    gap = rng.integers(2, min(max_gap, frames - 1) + 1, n)
    clip = rng.integers(0, n_clips, n)
    i = (rng.random(n) * (frames - gap)).astype(np.int64)  # uniform in 0 .. frames - gap - 1
    j = i + 1 + (rng.random(n) * (gap - 1)).astype(np.int64)  # strictly between i and k
    return np.stack([clip, i, j, i + gap], axis=1)


def train_interpolator(
    latent_clips: np.ndarray | Tensor,
    config: TrainConfig = TrainConfig(),
    model_config: InterpolatorConfig | None = None,
    on_progress: Callable[[int, float], None] | None = None,
) -> KeyframeInterpolator:
    """A `KeyframeInterpolator` fitted by MSE on triplets from (N, T, C, h, w) latent clips (on the CPU)."""
    clips = _check_clips(latent_clips, min_frames=3)
    N, T, C = clips.shape[:3]
    model_config = model_config or InterpolatorConfig(channels=C)
    if model_config.channels != C:
        raise MediaError(f"model_config.channels is {model_config.channels}, the latents have C = {C}")
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(config.seed)
        model = KeyframeInterpolator(model_config)
    model.scale.fill_(clips.std().clamp_min(1e-6).item())
    rng = np.random.default_rng(config.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    warmup = max(1, config.steps // 20)

    def lr_factor(s: int) -> float:  # 5% warm-up, then cosine to zero
        return min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / config.steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    model.train()
    for step in range(config.steps):
        c, i, j, k = torch.from_numpy(sample_triplets(rng, N, T, config.max_gap, config.batch_size)).T
        t = (j - i).float() / (k - i).float()  # (B,)
        pred = model(clips[c, i], clips[c, k], t)
        loss = F.mse_loss(pred, clips[c, j])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if on_progress:
            on_progress(step + 1, loss.item())
    return model.eval()


@torch.no_grad()
def evaluate_interpolator(
    model: KeyframeInterpolator,
    latent_clips: np.ndarray | Tensor,
    gaps: tuple[int, ...] = (2, 4),
    batch: int = 256,
) -> dict[str, float]:
    """MSE of the model and of the linear blend over every triplet (i, j, i + gap) of the clips."""
    clips = _check_clips(latent_clips, min_frames=min(gaps) + 1)
    N, T = clips.shape[:2]
    rows = [
        (c, i, j, i + g) for g in gaps for c in range(N) for i in range(T - g) for j in range(i + 1, i + g)
    ]
    if not rows:
        raise MediaError(f"clips of {T} frames hold no triplet with gaps {gaps}")
    idx = torch.tensor(rows)  # (M, 4)
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64)
    for chunk in idx.split(batch):
        c, i, j, k = chunk.T
        t = (j - i).float() / (k - i).float()
        z0, z1, target = clips[c, i], clips[c, k], clips[c, j]
        blend = z0 + t.view(-1, 1, 1, 1) * (z1 - z0)
        sums[0] += (model(z0, z1, t) - target).pow(2).sum().double()
        sums[1] += (blend - target).pow(2).sum().double()
    model.train(was_training)
    mse, blend_mse = (sums / (len(rows) * clips[0, 0].numel())).tolist()
    return {
        "mse": mse,
        "blend_mse": blend_mse,
        "gain": 1.0 - mse / max(blend_mse, 1e-30),
        "triplets": float(len(rows)),
    }


# ---------------------------------------------------------------------------------------------------- files


def save_interpolator(model: KeyframeInterpolator, path: str | Path) -> Path:
    """One .safetensors file, the config as JSON in its metadata; written to a temp name, then renamed."""
    return save_with_config(model, model.config, FORMAT, path)


def load_interpolator(path: str | Path, expect: InterpolatorConfig | None = None) -> KeyframeInterpolator:
    """A saved interpolator in eval mode; MediaError naming the file if it is not one (or not `expect`)."""
    path = Path(path)
    meta, state = read_with_config(path)
    if meta.get("format") != FORMAT:
        raise MediaError(f"{path}: not a keyframe interpolator (metadata format {meta.get('format')!r})")
    try:
        raw = json.loads(meta["config"])
        config = InterpolatorConfig(**{**raw, "dilations": tuple(raw["dilations"])})
    except (KeyError, TypeError, ValueError) as e:
        raise MediaError(f"{path}: bad interpolator config in the metadata: {e}") from None
    if expect is not None and config != expect:
        raise MediaError(f"{path}: holds an interpolator for {config}, expected {expect}")
    model = KeyframeInterpolator(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != expected:
        diff = sorted(set(got.items()) ^ set(expected.items()))[:3]
        raise MediaError(f"{path}: tensors do not match its config {config}: {diff}")
    model.load_state_dict(state, strict=True)
    return model.eval()
