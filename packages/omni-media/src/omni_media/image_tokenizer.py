"""A trainable discrete image tokenizer: conv encoder -> FSQ grid of tokens -> conv decoder.

The shape of VQGAN's tokenizer (Esser et al. 2021) with its vector quantiser replaced by FSQ (Mentzer
et al. 2023, `quantize.FSQ`), so there is no codebook loss and no collapse; trained on pixels alone
(L1 + MSE, no GAN), which is enough for MNIST: a 28x28 digit becomes a 7x7 grid of 49 tokens from a
1000-code vocabulary. `encode` and `decode` have no data-dependent control flow in their graph halves
(`encoder_module()` / `decoder_module()`), so both pass `torch.export` and go to ONNX as they are.
Checkpoints are one .safetensors file with the config as JSON in its metadata; nothing is unpickled.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omni_media.checkpoint import read_with_config, save_with_config
from omni_media.digits import (
    ClassifierTrainConfig,
    DigitClassifier,
    accuracy,
    as_float_images,
    train_digit_classifier,
)
from omni_media.errors import MediaError
from omni_media.quantize import FSQ

CHECKPOINT_FORMAT = "omni-image-tokenizer/1"


def _int_at_least(v: object, lo: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


@dataclass(frozen=True)
class ImageTokenizerConfig:
    image_size: int = 28
    channels: int = 1
    widths: tuple[int, ...] = (32, 64)  # one stride-2 stage each: the grid is image_size / 2**len(widths)
    res_blocks: int = 1  # residual blocks at grid resolution, in encoder and decoder alike
    levels: tuple[int, ...] = (8, 5, 5, 5)  # FSQ levels: 1000 codes

    def __post_init__(self) -> None:
        for name in ("image_size", "channels"):
            if not _int_at_least(v := getattr(self, name), 1):
                raise ValueError(f"ImageTokenizerConfig.{name} must be a positive integer, got {v!r}")
        if not _int_at_least(self.res_blocks, 0):
            raise ValueError(
                f"ImageTokenizerConfig.res_blocks must be an integer >= 0, got {self.res_blocks!r}"
            )
        if not self.widths or not all(_int_at_least(w, 1) for w in self.widths):
            raise ValueError(f"ImageTokenizerConfig.widths must be positive integers, got {self.widths!r}")
        if not self.levels or not all(_int_at_least(n, 2) for n in self.levels):
            raise ValueError(f"ImageTokenizerConfig.levels must be integers >= 2, got {self.levels!r}")
        if self.image_size % self.downsample:
            raise ValueError(
                f"ImageTokenizerConfig.image_size {self.image_size} must be divisible by the downsample "
                f"factor 2**len(widths) = {self.downsample}"
            )

    @property
    def downsample(self) -> int:
        return 2 ** len(self.widths)

    @property
    def grid(self) -> tuple[int, int]:
        return (self.image_size // self.downsample,) * 2


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 2000  # ~3.5 min on one CPU core: 27 dB, 99.0% digit accuracy on MNIST reconstructions
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0
    loss: Literal["mse", "l1+mse"] = "l1+mse"
    time_budget_s: float | None = None  # stop early (and no longer deterministically) past this

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            if not _int_at_least(v := getattr(self, name), 1):
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {v!r}")
        if not (isinstance(self.lr, int | float) and 0 < self.lr < 1):
            raise ValueError(f"TrainConfig.lr must be in (0, 1), got {self.lr!r}")
        if self.loss not in ("mse", "l1+mse"):
            raise ValueError(f"TrainConfig.loss must be 'mse' or 'l1+mse', got {self.loss!r}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(f"TrainConfig.time_budget_s must be > 0 or None, got {self.time_budget_s!r}")


class ResBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


class ImageTokenizer(nn.Module):
    """Images (B, C, H, W) in [0, 1] <-> tokens (B, h, w) in [0, vocab_size)."""

    def __init__(self, config: ImageTokenizerConfig):
        super().__init__()
        self.config = c = config
        self.fsq = FSQ(c.levels)
        w = c.widths
        enc: list[nn.Module] = [nn.Conv2d(c.channels, w[0], 3, padding=1)]
        for i, width in enumerate(w):
            enc += [nn.SiLU(), nn.Conv2d(w[max(i - 1, 0)], width, 4, stride=2, padding=1)]  # halves H, W
        enc += [ResBlock(w[-1]) for _ in range(c.res_blocks)]
        enc += [nn.SiLU(), nn.Conv2d(w[-1], self.fsq.dim, 1)]
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [nn.Conv2d(self.fsq.dim, w[-1], 3, padding=1)]
        dec += [ResBlock(w[-1]) for _ in range(c.res_blocks)]
        for i in reversed(range(len(w))):
            dec += [nn.SiLU(), nn.ConvTranspose2d(w[i], w[max(i - 1, 0)], 4, stride=2, padding=1)]
        dec += [nn.SiLU(), nn.Conv2d(w[0], c.channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    @property
    def vocab_size(self) -> int:
        return self.fsq.codebook_size

    @property
    def grid(self) -> tuple[int, int]:
        return self.config.grid

    def _check_images(self, images: Tensor) -> None:
        c = self.config
        if images.ndim != 4 or tuple(images.shape[1:]) != (c.channels, c.image_size, c.image_size):
            raise MediaError(
                f"images must be (B, {c.channels}, {c.image_size}, {c.image_size}), got {tuple(images.shape)}"
            )

    def _quantize(self, images: Tensor) -> tuple[Tensor, Tensor]:
        z = self.encoder(images * 2 - 1).permute(0, 2, 3, 1)  # (B, h, w, d)
        return self.fsq(z)  # (B, h, w, d) codes in [-1, 1], (B, h, w) tokens

    def _render(self, codes: Tensor) -> Tensor:
        # A linear output, clamped only in `decode`: a sigmoid head saturates at black on MNIST's empty
        # background within 50 steps and never recovers (loss stuck at that of an all-black image).
        return self.decoder(codes.permute(0, 3, 1, 2))  # (B, C, H, W)

    def _codes(self, tokens: Tensor) -> Tensor:
        return self.fsq.codes(tokens)  # unchecked: `decode` checks eagerly, an exported graph clamps

    def encode(self, images: Tensor) -> Tensor:
        """(B, C, H, W) float in [0, 1] -> (B, h, w) int64 tokens."""
        self._check_images(images)
        return self._quantize(images)[1]

    def decode(self, tokens: Tensor) -> Tensor:
        """(B, h, w) tokens -> (B, C, H, W) images in [0, 1]."""
        if tokens.ndim != 3 or tuple(tokens.shape[1:]) != self.grid:
            raise MediaError(f"tokens must be (B, {self.grid[0]}, {self.grid[1]}), got {tuple(tokens.shape)}")
        if not torch.compiler.is_exporting() and tokens.numel():
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi >= self.vocab_size:
                raise MediaError(f"tokens must be in [0, {self.vocab_size}), got values in [{lo}, {hi}]")
        return self._render(self._codes(tokens)).clamp(0, 1)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C, H, W) -> (unclamped reconstruction (B, C, H, W), tokens (B, h, w)), for training."""
        self._check_images(images)
        codes, tokens = self._quantize(images)
        return self._render(codes), tokens

    def encoder_module(self) -> nn.Module:
        return ImageEncoderGraph(self)

    def decoder_module(self) -> nn.Module:
        return ImageDecoderGraph(self)


class ImageEncoderGraph(nn.Module):
    """The encode half alone, for torch.export / ONNX: images (B, C, H, W) -> tokens (B, h, w)."""

    def __init__(self, tokenizer: ImageTokenizer):
        super().__init__()
        self.tokenizer = tokenizer

    def forward(self, images: Tensor) -> Tensor:
        return self.tokenizer.encode(images)


class ImageDecoderGraph(nn.Module):
    """The decode half alone, for torch.export / ONNX: tokens (B, h, w) -> images (B, C, H, W)."""

    def __init__(self, tokenizer: ImageTokenizer):
        super().__init__()
        self.tokenizer = tokenizer

    def forward(self, tokens: Tensor) -> Tensor:
        return self.tokenizer.decode(tokens)


def save_image_tokenizer(tokenizer: ImageTokenizer, path: str | Path) -> Path:
    """Write weights + config to one .safetensors file, atomically (temp file in the folder, then rename)."""
    return save_with_config(tokenizer, tokenizer.config, CHECKPOINT_FORMAT, path)


def load_image_tokenizer(path: str | Path) -> ImageTokenizer:
    """Read a file written by `save_image_tokenizer`; MediaError naming it if it is not one that fits."""
    path = Path(path)
    meta, state = read_with_config(path)
    if meta.get("format") != CHECKPOINT_FORMAT or "config" not in meta:
        raise MediaError(f"{path}: no image tokenizer config in the metadata (format {meta.get('format')!r})")
    try:
        raw = json.loads(meta["config"])
        raw = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
        config = ImageTokenizerConfig(**raw)
    except (ValueError, TypeError, AttributeError, RecursionError) as e:
        raise MediaError(f"{path}: bad image tokenizer config: {' '.join(str(e).split())[:200]}") from None
    tokenizer = ImageTokenizer(config)
    expected = tokenizer.state_dict()
    if missing := sorted(expected.keys() - state.keys()):
        raise MediaError(f"{path}: missing tensors {missing[:3]} for the config it holds")
    if unknown := sorted(state.keys() - expected.keys()):
        raise MediaError(f"{path}: unknown tensors {unknown[:3]} for the config it holds")
    for k, v in expected.items():
        if state[k].shape != v.shape:
            raise MediaError(
                f"{path}: tensor {k!r} has shape {tuple(state[k].shape)}, the config implies {tuple(v.shape)}"
            )
    tokenizer.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
    return tokenizer.eval()


def reconstruction_loss(recon: Tensor, target: Tensor, kind: str) -> Tensor:
    mse = F.mse_loss(recon, target)
    return mse if kind == "mse" else mse + F.l1_loss(recon, target)


def train_image_tokenizer(
    images: np.ndarray | Tensor,
    config: ImageTokenizerConfig = ImageTokenizerConfig(),
    train: TrainConfig = TrainConfig(),
    on_progress: Callable[[int, float], None] | None = None,
) -> ImageTokenizer:
    """Train on uint8 (N, H, W[, C]) images with AdamW, warmup + cosine decay; deterministic given the seed."""
    x = as_float_images(images, config.channels)
    if x.shape[-2:] != (config.image_size, config.image_size):
        raise MediaError(f"images are {tuple(x.shape[-2:])}, the config expects {config.image_size} square")
    with torch.random.fork_rng(devices=[]):  # seed a private RNG, leave the caller's alone
        torch.manual_seed(train.seed)
        model = ImageTokenizer(config)
        opt = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=1e-4, betas=(0.9, 0.99))
        gen = torch.Generator().manual_seed(train.seed)
        warmup = min(100, train.steps // 10)  # a short warmup: Adam's first steps are the largest
        start = time.monotonic()
        model.train()
        for step in range(train.steps):
            t = (step - warmup) / max(train.steps - warmup, 1)
            scale = (step + 1) / warmup if step < warmup else 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t))
            for group in opt.param_groups:
                group["lr"] = train.lr * scale
            batch = x[torch.randint(len(x), (train.batch_size,), generator=gen)]
            recon, _ = model(batch)
            loss = reconstruction_loss(recon, batch, train.loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if on_progress is not None:
                on_progress(step + 1, loss.item())
            if train.time_budget_s is not None and time.monotonic() - start > train.time_budget_s:
                break
        return model.eval()


def psnr(a: np.ndarray | Tensor, b: np.ndarray | Tensor, max_value: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of the mean squared error over all of `a` and `b` (inf if equal)."""
    a, b = (torch.as_tensor(np.asarray(t), dtype=torch.float64) for t in (a, b))
    if a.shape != b.shape:
        raise MediaError(f"psnr needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(max_value**2 / mse)


@torch.no_grad()
def reconstruct(
    tokenizer: ImageTokenizer, images: np.ndarray | Tensor, batch_size: int = 500
) -> tuple[Tensor, Tensor]:
    """(reconstructions (N, C, H, W) in [0, 1], tokens (N, h, w)) through encode then decode."""
    tokenizer.eval()
    x = as_float_images(images, tokenizer.config.channels)
    tokens = torch.cat([tokenizer.encode(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
    recon = torch.cat([tokenizer.decode(tokens[i : i + batch_size]) for i in range(0, len(x), batch_size)])
    return recon, tokens


def evaluate_image_tokenizer(
    tokenizer: ImageTokenizer,
    classifier: DigitClassifier,
    images: np.ndarray | Tensor,
    labels: np.ndarray | Tensor,
) -> dict[str, float]:
    """PSNR, classifier accuracy on originals and reconstructions, codebook usage and tokens per image."""
    x = as_float_images(images, tokenizer.config.channels)
    recon, tokens = reconstruct(tokenizer, x)
    h, w = tokenizer.grid
    return {
        "psnr_db": psnr(recon, x),
        "accuracy_original": accuracy(classifier, x, labels),
        "accuracy_reconstructed": accuracy(classifier, recon, labels),
        "codebook_usage": len(torch.unique(tokens)) / tokenizer.vocab_size,
        "tokens_per_image": float(h * w),
        "bits_per_image": h * w * math.log2(tokenizer.vocab_size),
    }


def mnist_experiment(
    cache_dir: Path | None = None,
    steps: int = TrainConfig.steps,
    classifier_steps: int = ClassifierTrainConfig.steps,
    on_progress: Callable[[str, int, float], None] | None = None,
    test_images: int | None = None,
) -> tuple[ImageTokenizer, DigitClassifier, dict[str, float]]:
    """Train the default tokenizer and a digit classifier on MNIST; evaluate on its 10k test images
    (or the first `test_images` of them)."""
    from omni_media.data import load_mnist

    mnist = load_mnist(cache_dir)

    def report(stage: str) -> Callable[[int, float], None] | None:
        return None if on_progress is None else lambda step, loss: on_progress(stage, step, loss)

    start = time.monotonic()
    tokenizer = train_image_tokenizer(
        mnist.train_images, ImageTokenizerConfig(), TrainConfig(steps=steps), report("tokenizer")
    )
    tokenizer_s = time.monotonic() - start
    classifier = train_digit_classifier(
        mnist.train_images,
        mnist.train_labels,
        ClassifierTrainConfig(steps=classifier_steps),
        report("classifier"),
    )
    classifier_s = time.monotonic() - start - tokenizer_s
    n = test_images or len(mnist.test_images)
    figures = evaluate_image_tokenizer(tokenizer, classifier, mnist.test_images[:n], mnist.test_labels[:n])
    figures |= {
        "tokenizer_train_s": tokenizer_s,
        "classifier_train_s": classifier_s,
        "train_s": tokenizer_s + classifier_s,
        "tokenizer_steps": float(steps),
        "classifier_steps": float(classifier_steps),
    }
    return tokenizer, classifier, figures
