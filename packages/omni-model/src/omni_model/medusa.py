"""Medusa heads (Cai et al. 2024, arXiv:2401.10774): extra next-next-token heads on a frozen base, the
drafts of self-speculative decoding. Head k maps the base's final hidden state at t to logits for token
t+k+1 through `layers` residual blocks x + SiLU(W x + b) and the base's own frozen lm_head (shared, not
saved). W = b = 0 at init, so every head starts as the base's next-token head. This is Medusa's parallel
form; DeepSeek-V3's MTP (omni_model.mtp) is the sequential one.

omni_train trains them; omni_runtime drafts with them. Heads save on their own (`heads.safetensors` +
`heads.json`, naming the base they belong to) and are checked against a base before use.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from omni_model.decoder import Decoder
from omni_model.errors import CheckpointError, ConfigError
from omni_model.files import writing_dir

WEIGHTS, META, COUNTS = "heads.safetensors", "heads.json", "token-counts.npy"
FORMAT, VERSION = "omni-medusa-heads", 1
MAX_META_BYTES = 1 << 16  # heads.json is a config and a base name: bytes
MAX_HEADS = MAX_LAYERS = 32  # a bound for untrusted configs; Medusa uses 3-5 heads of 1 layer


@dataclass(frozen=True)
class HeadsConfig:
    n_heads: int = 3  # head k predicts token t+k+1; the base itself predicts t+1
    layers: int = 1  # residual blocks per head

    def __post_init__(self) -> None:
        for name, hi in (("n_heads", MAX_HEADS), ("layers", MAX_LAYERS)):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= hi):
                raise ConfigError(f"HeadsConfig.{name} must be an integer in 1..{hi}, got {v!r}")


class ResBlock(nn.Module):
    """x + SiLU(W x + b), zero at init: SiLU(0) = 0, so the block starts as the identity."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + F.silu(self.linear(x))


class MedusaHeads(nn.Module):
    """The heads' blocks; `forward(h)` maps hidden states (B, T, D) to one per head (n, B, T, D)."""

    def __init__(self, dim: int, cfg: HeadsConfig) -> None:
        super().__init__()
        self.dim, self.config = dim, cfg
        self.blocks = nn.ModuleList(
            nn.Sequential(*(ResBlock(dim) for _ in range(cfg.layers))) for _ in range(cfg.n_heads)
        )

    def forward(self, h: Tensor) -> Tensor:
        return torch.stack([head(h) for head in self.blocks])  # (n, B, T, D)


def save_heads(heads: MedusaHeads, cfg: HeadsConfig, folder: str | Path, *, base: str, base_sha256: str | None,
               base_dim: int, vocab_size: int, token_counts: np.ndarray | None = None,
               draft_vocab: int | None = None) -> Path:  # fmt: skip
    """Write heads.safetensors and heads.json (config, dim, vocabulary, base identity) to `folder`, atomically;
    `token_counts` (vocab_size,): how often the base produced each token in the heads' training text
    (token-counts.npy: what a reduced drafting vocabulary is chosen from); `draft_vocab`: the size of the
    frequency-ranked set they were trained to draft from (`top_tokens(token_counts, draft_vocab)`)."""
    if heads.config != cfg or heads.dim != base_dim:
        raise CheckpointError(
            f"heads {heads.config} of dim {heads.dim}; the call says {cfg} of dim {base_dim}"
        )
    out = Path(folder)
    with writing_dir(out, marker=META, what="a Medusa heads folder", error=CheckpointError) as tmp:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in heads.state_dict().items()}, str(tmp / WEIGHTS)
        )
        meta = {"format": FORMAT, "version": VERSION, "config": asdict(cfg), "dim": base_dim,
                "vocab_size": vocab_size, "base": base, "base_sha256": base_sha256, "draft_vocab": draft_vocab}  # fmt: skip
        (tmp / META).write_text(json.dumps(meta, indent=1))
        if token_counts is not None:
            if token_counts.shape != (vocab_size,):
                raise CheckpointError(
                    f"token_counts has shape {token_counts.shape}; the vocabulary has {vocab_size}"
                )
            np.save(tmp / COUNTS, token_counts.astype(np.int64), allow_pickle=False)
    return out


def load_heads(folder: str | Path, base_model: Decoder, *, base_sha256: str | None = None) -> MedusaHeads:
    """Heads saved by `save_heads`, checked against `base_model` (dim, vocabulary) and, when given,
    the base's sha256; every tensor's name, shape and values are checked before use."""
    folder = Path(folder)
    meta_path, weights_path = folder / META, folder / WEIGHTS
    for p in (meta_path, weights_path):
        if not p.is_file():
            raise CheckpointError(f"{folder}: no {p.name} (not a Medusa heads folder; see save_heads)")
    cfg, dim, vocab, base, sha = read_heads_meta(meta_path)
    ours = base_model.config
    if (base_sha256 is not None and sha != base_sha256) or (dim, vocab) != (ours.dim, ours.vocab_size):
        raise CheckpointError(
            f"{meta_path}: heads trained for another base ({base!r}: dim {dim}, vocabulary {vocab}, sha256 "
            f"{sha or 'not recorded'}; this one: dim {ours.dim}, vocabulary {ours.vocab_size}, sha256 "
            f"{base_sha256 or 'not given'})"
        )
    heads = MedusaHeads(dim, cfg)
    want = {k: tuple(v.shape) for k, v in heads.state_dict().items()}
    try:
        got = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights_path}: not a readable safetensors file: {_short(e)}") from None
    if missing := sorted(set(want) - set(got)):
        raise CheckpointError(
            f"{weights_path}: missing tensor {missing[0]!r} ({len(missing)} missing in all)"
        )
    if unexpected := sorted(set(got) - set(want)):
        raise CheckpointError(
            f"{weights_path}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all)"
        )
    for k, shape in want.items():
        t = got[k]
        if tuple(t.shape) != shape:
            raise CheckpointError(
                f"{weights_path}: tensor {k!r} has shape {tuple(t.shape)}, the heads need {shape}"
            )
        if not t.is_floating_point() or not torch.isfinite(t).all():
            raise CheckpointError(f"{weights_path}: tensor {k!r} is not finite floating point ({t.dtype})")
    with torch.no_grad():
        for k, v in heads.state_dict().items():
            v.copy_(got[k])
    return heads


def read_heads_meta(path: Path) -> tuple[HeadsConfig, int, int, str, str | None]:
    """heads.json's config, dim, vocabulary size and base identity, every field's type checked."""
    if path.stat().st_size > MAX_META_BYTES:
        raise CheckpointError(
            f"{path}: {path.stat().st_size:,} bytes; a heads.json holds at most {MAX_META_BYTES:,}"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: not readable JSON: {_short(e)}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an OmniCoder Medusa heads file (format {FORMAT!r})")
    if meta.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: heads format version {meta.get('version')!r}; this build reads {VERSION}"
        )
    c = meta.get("config")
    if not isinstance(c, dict):
        raise CheckpointError(f"{path}: 'config' must be a JSON object, got {_short(c)}")
    try:
        cfg = HeadsConfig(**{k: c.get(k) for k in ("n_heads", "layers")})
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    for key in ("dim", "vocab_size"):
        v = meta.get(key)
        if not (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 1 << 24):
            raise CheckpointError(f"{path}: {key!r} must be a positive integer, got {_short(v)}")
    base, sha = meta.get("base"), meta.get("base_sha256")
    if not isinstance(base, str):
        raise CheckpointError(f"{path}: 'base' must be a string, got {_short(base)}")
    if sha is not None and not isinstance(sha, str):
        raise CheckpointError(f"{path}: 'base_sha256' must be a string or null, got {_short(sha)}")
    return cfg, meta["dim"], meta["vocab_size"], base, sha


def _short(v: Any) -> str:
    return " ".join(str(v).split())[:120]


def top_tokens(counts: np.ndarray, n: int) -> np.ndarray:
    """The n most frequent token ids (ties: the lower id first), ascending."""
    order = np.lexsort((np.arange(len(counts)), -counts.astype(np.int64)))
    return np.sort(order[:n]).astype(np.int64)


def head_logits(base: Decoder, heads: MedusaHeads, h: Tensor) -> Tensor:
    """The heads' logits (n, ..., V) from the base's final-normed hidden states h (..., D)."""
    z = heads(h.to(next(heads.parameters()).dtype)).to(h.dtype)
    return base.logits(z)
