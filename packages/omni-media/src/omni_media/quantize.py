"""Discrete bottlenecks for the media tokenizers: finite scalar quantisation (FSQ).

FSQ (Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE Made Simple") bounds each of d latent
channels to L_i levels and rounds, with a straight-through gradient; the implied codebook is the
product of the levels (e.g. (8, 5, 5, 5) gives 1000 codes) and every code is reachable, so there is no
codebook collapse and nothing to balance. A token is the mixed-radix index of a channel vector.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class FSQ(nn.Module):
    """Quantise the last dimension (d == len(levels)) to a grid; `forward` returns (quantised, indices)."""

    def __init__(self, levels: tuple[int, ...]):
        super().__init__()
        if not levels or any(not isinstance(n, int) or n < 2 for n in levels):
            raise ValueError(f"levels must be integers >= 2, got {levels!r}")
        self.levels = tuple(levels)
        radix = [math.prod(levels[:i]) for i in range(len(levels))]
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.float32), persistent=False)
        self.register_buffer("_radix", torch.tensor(radix, dtype=torch.int64), persistent=False)

    @property
    def dim(self) -> int:
        return len(self.levels)

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels)

    def bound(self, z: Tensor) -> Tensor:
        """Squash to (-(L-1)/2, (L-1)/2), shifted by a half step for even L so rounding gives L values."""
        half = (self._levels - 1) * (1 + 1e-3) / 2
        offset = torch.where(self._levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half)
        return torch.tanh(z + shift) * half - offset

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(..., d) latents -> ((..., d) values in [-1, 1] with straight-through rounding, (...) indices)."""
        b = self.bound(z)
        q = b + (torch.round(b) - b).detach()
        half_width = self._levels // 2
        return q / half_width, self._to_indices(torch.round(b).detach())

    def _to_indices(self, rounded: Tensor) -> Tensor:
        digits = (rounded + self._levels // 2).long()  # (..., d) in [0, L)
        return (digits * self._radix).sum(-1)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """(...) indices -> (..., d) quantised values in [-1, 1], as `forward` returns them."""
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            raise ValueError(f"token indices must be in [0, {self.codebook_size}), got {int(indices.max())}")
        return self.codes(indices)

    def codes(self, indices: Tensor) -> Tensor:
        """`indices_to_codes` with out-of-range indices clamped instead of refused: no data-dependent
        branch, so it traces into an exported graph."""
        levels = self._levels.long()
        digits = (indices.long().clamp(0, self.codebook_size - 1).unsqueeze(-1) // self._radix) % levels
        half_width = levels // 2
        return (digits - half_width).float() / half_width.float()

    def nearest(self, values: Tensor) -> Tensor:
        """(..., d) values in code space -> (...) indices of the nearest grid point, channel by channel."""
        levels = self._levels.long()
        half_width = levels // 2
        digits = (torch.round(values * half_width) + half_width).long()
        return (digits.clamp(torch.zeros_like(levels), levels - 1) * self._radix).sum(-1)
