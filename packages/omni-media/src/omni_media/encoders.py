"""Small convolutional encoders trained jointly with a decoder: pixels or log-mel in, a few embeddings out.

They are the input side of a model trained from scratch on a narrow world (the digit world), where a
pretrained SigLIP or Whisper tower would be most of the parameters and none of the point:

- `ImageEncoder`: (B, 1, H, W) in [0, 1] -> (B, g*g, dim). A LeNet-style body (conv, batch norm,
  ReLU, max pool, twice) with two coordinate channels riding along (CoordConv, Liu et al. 2018); its
  map, pooled to 4 x 4 cells, is flattened and projected to the g*g embeddings, so every embedding sees
  where every stroke is: what tells a 6 from a 9, and a digit at the left of the canvas from one at the
  right. (Pooling the map to g x g cells first, one embedding per cell, left the digit unreadable: 12%
  against 90% after 150 s of image -> text training alone.)
- `SpeechEncoder`: (B, 80, frames) Whisper log-mel at 100 frames/s -> (B, ceil(frames / 8), dim).
- `ClipEncoder`: (B, T, 1, H, W) frames -> (B, T*g*g, dim), the image encoder on every frame.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from omni_media.errors import MediaError


def _coords(b: int, h: int, w: int, like: Tensor) -> Tensor:
    y = torch.linspace(-1, 1, h, dtype=like.dtype, device=like.device).view(1, 1, h, 1).expand(b, 1, h, w)
    x = torch.linspace(-1, 1, w, dtype=like.dtype, device=like.device).view(1, 1, 1, w).expand(b, 1, h, w)
    return torch.cat([y, x], dim=1)


class ImageEncoder(nn.Module):
    CELLS = 4  # the map is pooled to CELLS x CELLS before the projection

    def __init__(self, dim: int, width: int = 32, grid: int = 2):
        super().__init__()
        if dim < 1 or width < 1 or grid < 1:
            raise MediaError(
                f"ImageEncoder: dim, width and grid must be positive, got {dim}, {width}, {grid}"
            )
        self.dim, self.grid = dim, grid
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(self.CELLS), nn.Flatten(),
        )  # fmt: skip
        flat = 2 * width * self.CELLS**2
        self.out = nn.Sequential(nn.LayerNorm(flat), nn.Linear(flat, grid * grid * dim))

    @property
    def n_tokens(self) -> int:
        return self.grid * self.grid

    def forward(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 1 or not images.is_floating_point():
            raise MediaError(f"images must be float (B, 1, H, W), got {images.dtype} {tuple(images.shape)}")
        b, _, h, w = images.shape
        if h < 4 * self.CELLS or w < 4 * self.CELLS:
            raise MediaError(f"images must be at least {4 * self.CELLS} px a side, got {h} x {w}")
        x = torch.cat([images * 2 - 1, _coords(b, h, w, images)], dim=1)
        return self.out(self.body(x)).view(b, self.n_tokens, self.dim)  # (B, g*g, dim)


class ClipEncoder(nn.Module):
    """Every frame through one ImageEncoder; the decoder's positions order the frames."""

    def __init__(self, dim: int, width: int = 32, grid: int = 2):
        super().__init__()
        self.frames = ImageEncoder(dim, width, grid)

    def n_tokens(self, frames: int) -> int:
        return frames * self.frames.n_tokens

    def forward(self, clips: Tensor) -> Tensor:
        if clips.ndim != 5:
            raise MediaError(f"clips must be float (B, T, 1, H, W), got {tuple(clips.shape)}")
        b, t = clips.shape[:2]
        return self.frames(clips.flatten(0, 1)).view(b, t * self.frames.n_tokens, -1)


class SpeechEncoder(nn.Module):
    def __init__(self, dim: int, width: int = 128, n_mels: int = 80):
        super().__init__()
        if dim < 1 or width < 1:
            raise MediaError(f"SpeechEncoder: dim and width must be positive, got {dim}, {width}")
        self.n_mels = n_mels
        self.body = nn.Sequential(
            nn.Conv1d(n_mels, width, 5, stride=2, padding=2), nn.GELU(),
            nn.Conv1d(width, width, 5, stride=2, padding=2), nn.GELU(),
            nn.Conv1d(width, width, 5, stride=2, padding=2), nn.GELU(),
        )  # fmt: skip
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, dim))

    @staticmethod
    def n_tokens(frames: int) -> int:
        for _ in range(3):
            frames = (frames + 1) // 2  # kernel 5, stride 2, padding 2: ceil(frames / 2)
        return frames

    def forward(self, mel: Tensor) -> Tensor:
        if mel.ndim != 3 or mel.shape[1] != self.n_mels or not mel.is_floating_point():
            raise MediaError(f"log-mel must be float (B, {self.n_mels}, frames), got {tuple(mel.shape)}")
        return self.out(self.body(mel).transpose(1, 2))  # (B, ceil(frames / 8), dim)
