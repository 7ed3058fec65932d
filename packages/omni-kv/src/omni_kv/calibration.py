"""KV calibration: per layer, kv head and channel, the largest |key| and |value| a model produces on a
text, written as a JSON sidecar that the quantized caches read.

A few key channels carry most of the magnitude (the reason KIVI quantizes keys per channel). A cache
that codes keys per token divides each channel by its calibrated scale first and multiplies it back
after decoding (the smoothing of SmoothQuant, Xiao et al. 2023, applied to the cache), so a token's
codes are not spent on one outlier channel. The statistics are also what an exported runtime with
static int8 KV scales needs.

The sidecar is untrusted input: its shape, its numbers and the model it claims to describe are
checked before use, and a mismatch is a one-line error.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from omni_kv.dense import DenseKVCache
from omni_kv.protocol import KVCacheError

FORMAT, VERSION = "omnicoder-kv-calibration", 1


@dataclass(frozen=True)
class KVCalibration:
    model: str  # what the statistics describe (a name or path; informational)
    n_layers: int
    n_kv_heads: int
    head_dim: int
    tokens: int  # tokens the statistics saw
    key_absmax: Tensor  # (n_layers, n_kv_heads, head_dim) float32
    value_absmax: Tensor  # (n_layers, n_kv_heads, head_dim) float32

    def check_model(self, n_layers: int, n_kv_heads: int, head_dim: int, what: str = "the model") -> None:
        mine, theirs = (self.n_layers, self.n_kv_heads, self.head_dim), (n_layers, n_kv_heads, head_dim)
        if mine != theirs:
            raise KVCacheError(
                f"KV calibration for {self.model!r} has (layers, kv heads, head dim) = {mine}; {what} has {theirs}"
            )

    def key_scales(self, layer: int, floor: float = 1e-2) -> Tensor:
        """(n_kv_heads, head_dim) divisors that bring every key channel of `layer` to a similar range:
        each channel's absmax over the head's mean, floored so quiet channels are not blown up."""
        a = self.key_absmax[layer]
        return (a / a.mean(dim=-1, keepdim=True)).clamp_min(floor)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        doc = {"format": FORMAT, "version": VERSION, "model": self.model, "n_layers": self.n_layers,
               "n_kv_heads": self.n_kv_heads, "head_dim": self.head_dim, "tokens": self.tokens,
               "key_absmax": self.key_absmax.tolist(), "value_absmax": self.value_absmax.tolist()}  # fmt: skip
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(doc, f)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path) -> KVCalibration:
        path = Path(path)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            raise KVCacheError(
                f"{path}: not a readable KV calibration file: {' '.join(str(e).split())[:160]}"
            ) from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise KVCacheError(f"{path}: not a KV calibration sidecar (format is not {FORMAT!r})")
        if doc.get("version") != VERSION:
            raise KVCacheError(
                f"{path}: KV calibration version {doc.get('version')!r}; this build reads {VERSION}"
            )
        dims = {}
        for key in ("n_layers", "n_kv_heads", "head_dim", "tokens"):
            v = doc.get(key)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 < v < 1 << 24:
                raise KVCacheError(f"{path}: {key} must be a positive integer, got {v!r}")
            dims[key] = v
        shape = (dims["n_layers"], dims["n_kv_heads"], dims["head_dim"])
        arrays = {}
        for key in ("key_absmax", "value_absmax"):
            try:
                t = torch.tensor(doc.get(key), dtype=torch.float32)
            except (TypeError, ValueError, RuntimeError):
                raise KVCacheError(f"{path}: {key} is not a numeric array") from None
            if tuple(t.shape) != shape:
                raise KVCacheError(f"{path}: {key} has shape {tuple(t.shape)}, expected {shape}")
            if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
                raise KVCacheError(f"{path}: {key} holds negative or non-finite values")
            arrays[key] = t
        model = doc.get("model")
        return cls(model if isinstance(model, str) else "?", *shape, dims["tokens"], arrays["key_absmax"],
                   arrays["value_absmax"])  # fmt: skip


class _Recorder(DenseKVCache):
    """A dense cache that also keeps the running absmax of what each layer writes."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        n, (_, h, d) = self.n_layers, self._shape_k
        self.k_max = torch.zeros(n, h, d)
        self.v_max = torch.zeros(n, h, self._shape_v[2])

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k_max[layer] = torch.maximum(self.k_max[layer], k.detach().abs().amax(dim=(0, 2)).float())
        self.v_max[layer] = torch.maximum(self.v_max[layer], v.detach().abs().amax(dim=(0, 2)).float())
        return super().update(layer, k, v)


@torch.inference_mode()
def calibrate(
    model, token_ids: list[int] | Tensor, name: str, context: int = 2048, chunk: int = 512
) -> KVCalibration:
    """Run `model` (an omni_model Decoder with grouped-query attention) over `token_ids` in windows of
    `context` tokens and record the key/value absmax per layer, kv head and channel."""
    cfg = model.config
    if cfg.mla is not None:
        raise KVCacheError(
            "KV calibration covers grouped-query attention; latent attention (MLA) is not supported yet"
        )
    ids = torch.as_tensor(token_ids, dtype=torch.long)
    if ids.numel() < 2:
        raise KVCacheError(f"KV calibration needs at least 2 tokens of text, got {ids.numel()}")
    dims = (cfg.n_layers, cfg.n_kv_heads, cfg.head_size)
    k_max, v_max = torch.zeros(dims), torch.zeros(dims)
    for s in range(0, ids.numel(), context):
        rec = _Recorder(*dims, max_len=context, dtype=model.embed_tokens.weight.dtype)
        w = ids[s : s + context]
        for c in range(0, w.numel(), chunk):
            model(w[None, c : c + chunk], cache=rec, last_only=True)
        k_max, v_max = torch.maximum(k_max, rec.k_max), torch.maximum(v_max, rec.v_max)
    if not math.isfinite(float(k_max.max())):
        raise KVCacheError("KV calibration saw non-finite keys; the model's weights are broken")
    return KVCalibration(name, *dims, ids.numel(), k_max, v_max)
