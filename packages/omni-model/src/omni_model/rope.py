"""Rotary position embeddings and the scaling variants real checkpoints use.

Frequencies follow the formulas of each method: linear position interpolation, dynamic NTK (base
stretched once the sequence outgrows the trained length), YaRN (per-band interpolation with a ramp
and an attention temperature; Peng et al. 2023) and Llama 3.1's smoothed band scaling. Rotation uses
the half-split layout of Hugging Face checkpoints; GGUF's interleaved q/k are permuted on import.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from omni_model.config import RopeConfig


def inv_frequencies(
    cfg: RopeConfig, dim: int, seq_len: int | None = None, max_position: int = 2048
) -> tuple[Tensor, float]:
    """Inverse frequencies (dim/2,) and the cos/sin scale for a rotary dim of `dim`."""
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    base = cfg.theta
    if cfg.type == "dynamic":
        trained = cfg.original_max_position or max_position
        n = max(seq_len or trained, trained)
        base = base * ((cfg.factor * n / trained) - (cfg.factor - 1)) ** (dim / (dim - 2))
    inv = 1.0 / (base**exponents)
    if cfg.type == "linear":
        return inv / cfg.factor, 1.0
    if cfg.type == "llama3":
        return _llama3(cfg, inv), 1.0
    if cfg.type == "yarn":
        return _yarn(cfg, dim, base, exponents)
    return inv, 1.0


def _llama3(cfg: RopeConfig, inv: Tensor) -> Tensor:
    old = cfg.original_max_position
    assert old is not None  # RopeConfig validates this for llama3
    low_wavelen, high_wavelen = old / cfg.low_freq_factor, old / cfg.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / cfg.factor, inv)
    smooth = (old / wavelen - cfg.low_freq_factor) / (cfg.high_freq_factor - cfg.low_freq_factor)
    smoothed = (1 - smooth) * scaled / cfg.factor + smooth * scaled
    mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(mid, smoothed, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(cfg: RopeConfig, dim: int, base: float, exponents: Tensor) -> tuple[Tensor, float]:
    old = cfg.original_max_position
    assert old is not None  # RopeConfig validates this for yarn
    if cfg.attention_factor is not None:
        attn = cfg.attention_factor
    elif cfg.mscale and cfg.mscale_all_dim:
        attn = _yarn_mscale(cfg.factor, cfg.mscale) / _yarn_mscale(cfg.factor, cfg.mscale_all_dim)
    else:
        attn = _yarn_mscale(cfg.factor)

    def correction_dim(rotations: float) -> float:  # the dim whose wavelength fits `rotations` times in `old`
        return dim * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(cfg.beta_fast), correction_dim(cfg.beta_slow)
    if cfg.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a zero-width ramp would divide by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos = base**exponents
    extrapolate = 1 - ramp  # 1: keep the original frequency (high-frequency dims), 0: interpolate
    inv = (1.0 / (cfg.factor * pos)) * (1 - extrapolate) + (1.0 / pos) * extrapolate
    return inv, attn


class Rope(nn.Module):
    """cos/sin tables for positions [0, max_len), extended on demand."""

    def __init__(self, cfg: RopeConfig, head_dim: int, max_len: int) -> None:
        super().__init__()
        self.cfg, self.head_dim, self.max_position = cfg, head_dim, max_len
        self.cos: Tensor
        self.sin: Tensor
        self._build(max_len)

    def _build(self, n: int, seq_len: int | None = None) -> None:
        inv, scale = inv_frequencies(self.cfg, self.head_dim, seq_len, self.max_position)
        t = torch.arange(n, dtype=torch.float32)
        freqs = torch.outer(t, inv)  # (n, Dh/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (n, Dh): the half-split layout
        self.register_buffer("cos", emb.cos() * scale, persistent=False)
        self.register_buffer("sin", emb.sin() * scale, persistent=False)
        self._table_len, self._inv = n, inv

    def shift(self, x: Tensor, delta: int) -> Tensor:
        """Keys x (B, H, T, Dh) rotated at positions p, turned into keys rotated at p + delta: a pure
        rotation by delta (the cos/sin scale of YaRN was applied once already)."""
        freqs = delta * self._inv.to(x.device)
        emb = torch.cat((freqs, freqs))
        return apply_rope(x, emb.cos().to(x.dtype), emb.sin().to(x.dtype))

    def forward(self, start: int, n: int) -> tuple[Tensor, Tensor]:
        """cos, sin of shape (n, Dh) for positions start .. start+n-1."""
        end = start + n
        if self.cfg.type == "dynamic":
            trained = self.cfg.original_max_position or self.max_position
            if end > trained:  # frequencies depend on the sequence length once it outgrows training
                inv, scale = inv_frequencies(self.cfg, self.head_dim, end, self.max_position)
                freqs = torch.outer(torch.arange(start, end, dtype=torch.float32), inv.to(self.cos.device))
                emb = torch.cat((freqs, freqs), dim=-1)
                return emb.cos() * scale, emb.sin() * scale
        if end > self._table_len:
            self._build(max(end, 2 * self._table_len))
        return self.cos[start:end], self.sin[start:end]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, H, T, Dh) by cos/sin (T, Dh) in the half-split layout."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin
