"""Latent KV cache for Multi-head Latent Attention (DeepSeek-V2/V3).

MLA caches, per token and layer, one normalised latent (`kv_lora_rank` values) and the decoupled
rotary key (`rope_dim` values) that every head shares, instead of full keys and values per head.
Both live side by side in one (B, max_len, rank + rope_dim) buffer per layer, the layout the absorbed
attention reads: `update(layer, latent, k_rope)` takes (B, 1, T, rank) and (B, 1, T, rope_dim) and
returns views of everything cached so far, (B, 1, S, rank) and (B, 1, S, rope_dim); `joint(layer)`
gives both as one (B, S, rank + rope_dim) view. Sizing, growth and rollback follow `DenseKVCache`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from omni_kv.protocol import CacheFullError, KVCacheError, SequenceCache, check_dims


class LatentKVCache(SequenceCache):
    def __init__(
        self,
        n_layers: int,
        kv_lora_rank: int,
        rope_dim: int,
        *,
        batch_size: int = 1,
        max_len: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        check_dims(
            max_len, n_layers=n_layers, kv_lora_rank=kv_lora_rank, rope_dim=rope_dim, batch_size=batch_size
        )
        self.n_layers, self.kv_lora_rank, self.rope_dim = n_layers, kv_lora_rank, rope_dim
        self.max_len, self.dtype, self.batch_size = max_len, dtype, batch_size
        cap = max_len if max_len is not None else 256
        width = kv_lora_rank + rope_dim
        self._buf = [torch.zeros(batch_size, cap, width, dtype=dtype, device=device) for _ in range(n_layers)]
        self._len = 0

    def _room(self) -> int:
        return min(b.shape[1] for b in self._buf)

    @property
    def capacity(self) -> int:
        return self._buf[0].shape[1]

    def nbytes(self) -> int:
        """Bytes held by the buffers (allocated, not only used)."""
        return sum(t.numel() * t.element_size() for t in self._buf)

    def bytes_per_token(self) -> int:
        """Bytes one cached token takes over all layers."""
        return self.n_layers * self._buf[0].shape[2] * self._buf[0].element_size() * self.batch_size

    def update(self, layer: int, latent: Tensor, k_rope: Tensor) -> tuple[Tensor, Tensor]:
        buf = self._buf[layer]
        t = latent.shape[2] if latent.ndim == 4 else -1
        r = self.kv_lora_rank
        if latent.shape != (buf.shape[0], 1, t, r) or k_rope.shape != (buf.shape[0], 1, t, self.rope_dim):
            raise KVCacheError(
                f"layer {layer}: latent {tuple(latent.shape)} / rope key {tuple(k_rope.shape)} do not fit a "
                f"latent cache of batch {buf.shape[0]}, rank {r}, rope dim {self.rope_dim}"
            )
        end = self._len + t
        if end > buf.shape[1]:
            if self.max_len is not None:
                raise CacheFullError(f"cache holds at most {self.max_len} tokens; {end} were requested")
            buf = self._grow(layer, end)
        buf[:, self._len : end, :r] = latent[:, 0]
        buf[:, self._len : end, r:] = k_rope[:, 0]
        used = buf[:, None, :end]  # (B, 1, S, rank + rope)
        return used[..., :r], used[..., r:]

    def joint(self, layer: int, length: int | None = None) -> Tensor:
        """(B, S, rank + rope_dim): the latents and rotary keys of the first S tokens of `layer`."""
        return self._buf[layer][:, : self._len if length is None else length]

    def _grow(self, layer: int, need: int) -> Tensor:
        old = self._buf[layer]
        new = old.new_zeros(old.shape[0], max(need, 2 * old.shape[1]), old.shape[2])
        new[:, : old.shape[1]] = old
        self._buf[layer] = new
        return new
