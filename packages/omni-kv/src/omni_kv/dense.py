"""Dense KV cache: one preallocated (B, Hkv, max_len, Dh) buffer per layer for keys and values.

Preallocation keeps decode free of allocation and concatenation: writing a token is one slice copy,
and attention reads a view of the first S positions. When `max_len` is None the buffers grow by
doubling, so an unknown generation length costs O(log n) copies in all.
"""

from __future__ import annotations

import torch
from torch import Tensor

from omni_kv.protocol import CacheFullError, KVCacheError, SequenceCache, check_dims


class DenseKVCache(SequenceCache):
    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        batch_size: int = 1,
        max_len: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        v_head_dim: int | None = None,
    ) -> None:
        check_dims(
            max_len, n_layers=n_layers, n_kv_heads=n_kv_heads, head_dim=head_dim, batch_size=batch_size
        )
        self.n_layers, self.max_len, self.dtype = n_layers, max_len, dtype
        self._shape_k = (batch_size, n_kv_heads, head_dim)
        self._shape_v = (batch_size, n_kv_heads, v_head_dim or head_dim)
        cap = max_len if max_len is not None else 256
        self._k = [self._alloc(self._shape_k, cap, device) for _ in range(n_layers)]
        self._v = [self._alloc(self._shape_v, cap, device) for _ in range(n_layers)]
        self._len = 0

    def _alloc(self, shape: tuple[int, int, int], cap: int, device) -> Tensor:
        b, h, d = shape
        return torch.zeros(b, h, cap, d, dtype=self.dtype, device=device)

    def _room(self) -> int:
        return min(k.shape[2] for k in self._k)

    @property
    def capacity(self) -> int:
        return self._k[0].shape[2]

    def nbytes(self) -> int:
        """Bytes held by the buffers (allocated, not only used)."""
        return sum(t.numel() * t.element_size() for t in self._k + self._v)

    def bytes_per_token(self) -> int:
        """Bytes one cached token takes over all layers (keys and values, the whole batch)."""
        return sum((t.numel() // t.shape[2]) * t.element_size() for t in self._k + self._v)

    def _grow(self, layer: int, need: int) -> None:
        cap = self._k[layer].shape[2]
        new_cap = max(need, 2 * cap)
        for bufs in (self._k, self._v):
            old = bufs[layer]
            new = old.new_zeros(old.shape[0], old.shape[1], new_cap, old.shape[3])
            new[:, :, :cap] = old
            bufs[layer] = new

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        kb = self._k[layer]
        b, h, t, _ = k.shape
        if (b, h) != kb.shape[:2] or k.shape[3] != kb.shape[3] or v.shape[:3] != k.shape[:3]:
            raise KVCacheError(
                f"layer {layer}: keys {tuple(k.shape)} / values {tuple(v.shape)} do not fit a cache of "
                f"(batch, heads, dim) = {self._shape_k}"
            )
        end = self._len + t
        if end > kb.shape[2]:
            if self.max_len is not None:
                raise CacheFullError(f"cache holds at most {self.max_len} tokens; {end} were requested")
            self._grow(layer, end)
        self._k[layer][:, :, self._len : end] = k
        self._v[layer][:, :, self._len : end] = v
        return self._k[layer][:, :, :end], self._v[layer][:, :, :end]
