"""Projectors from an encoder's features into a language model's embedding space.

`pixel_shuffle` merges each r x r neighbourhood of patch features into one token with r^2 times the
channels (space-to-depth), so a 512-patch image costs the language model 512 / r^2 positions: the
token-merging step of Idefics3 / SmolVLM (Laurençon et al. 2024). `Projector` is the LLaVA-style MLP
(Liu et al. 2023: Linear, GELU, Linear) that follows it; `r = 1` gives the plain MLP, as audio uses
after stacking `r` consecutive frames with `stack_frames`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor, nn

from omni_media.errors import MediaError


def pixel_shuffle(x: Tensor, r: int) -> Tensor:
    """(B, N, D) patch features on a square grid -> (B, N / r^2, D * r^2), row-major over the new grid."""
    b, n, d = x.shape
    side = math.isqrt(n)
    if side * side != n or side % r:
        raise MediaError(f"pixel_shuffle: {n} patches are not a square grid divisible by {r}")
    x = x.reshape(b, side // r, r, side // r, r, d)  # (B, h, r, w, r, D)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (B, h, w, r, r, D): each r x r block together
    return x.reshape(b, (side // r) ** 2, r * r * d)


def stack_frames(x: Tensor, r: int) -> Tensor:
    """(B, T, D) frame features -> (B, T / r, D * r), dropping a remainder: fewer, wider audio tokens."""
    b, t, d = x.shape
    t -= t % r
    return x[:, :t].reshape(b, t // r, r * d)


@dataclass(frozen=True)
class ProjectorConfig:
    in_dim: int  # the encoder's feature size
    out_dim: int  # the language model's embedding size
    merge: int = 1  # r: pixel_shuffle for "image", stack_frames for "audio"; 1 = none
    kind: str = "image"  # how tokens are merged: "image" (2-D grid) or "audio" (time)
    hidden_dim: int | None = None  # None: out_dim

    def __post_init__(self) -> None:
        for name in ("in_dim", "out_dim", "merge"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ProjectorConfig.{name} must be a positive integer, got {v!r}")
        if self.kind not in ("image", "audio"):
            raise ValueError(f"ProjectorConfig.kind must be 'image' or 'audio', got {self.kind!r}")
        if self.hidden_dim is not None and self.hidden_dim < 1:
            raise ValueError(f"ProjectorConfig.hidden_dim must be positive, got {self.hidden_dim}")

    def tokens(self, n_features: int) -> int:
        """How many language-model positions `n_features` encoder tokens become."""
        return n_features // (self.merge * self.merge if self.kind == "image" else self.merge)


class Projector(nn.Module):
    """Encoder features (B, N, in_dim) -> language-model embeddings (B, N', out_dim)."""

    def __init__(self, config: ProjectorConfig):
        super().__init__()
        self.config = config
        r = config.merge
        wide = config.in_dim * (r * r if config.kind == "image" else r)
        hidden = config.hidden_dim or config.out_dim
        self.fc1 = nn.Linear(wide, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, config.out_dim)

    def forward(self, features: Tensor) -> Tensor:
        r = self.config.merge
        if r > 1:
            features = (
                pixel_shuffle(features, r) if self.config.kind == "image" else stack_frames(features, r)
            )
        return self.fc2(self.act(self.fc1(features)))
