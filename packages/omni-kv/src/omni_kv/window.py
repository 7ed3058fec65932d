"""Sink + window KV cache (StreamingLLM, Xiao et al. 2024): the first `sinks` tokens and the last
`window` tokens, so generation runs on far past the trained context in constant memory.

Attention keeps large weights on the first few tokens whatever they say ("attention sinks");
dropping them is what makes a plain sliding window fall apart, keeping them is enough to hold
perplexity flat. Positions follow the paper: the model sees the cache as one contiguous stretch,
sinks then window, so no distance exceeds sinks + window. Here the window's keys keep the rotation of
their true positions (a ring buffer: a new token overwrites the oldest slot, nothing shifts), and the
sinks are re-rotated each step to sit just before the oldest window token. That takes `rotate(x, d)`,
which turns keys rotated at p into keys rotated at p + d; the model supplies it (omni_kv knows no
rotary details). Attention does not care in which order cached keys come, only that the new tokens
come last, which the layout keeps.

`kv_length(t)` tells the decoder how many keys the next update returns (its masks need it). A
forward of several tokens lets each see the whole cached window before it plus the new tokens up
to itself: up to window + T - 1 tokens back, as chunked StreamingLLM evaluation does.

Rolling back works for up to `max_rollback` of the most recent tokens: the tokens they evicted are
kept until then.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import torch
from torch import Tensor

from omni_kv.protocol import KVCacheError, SequenceCache, check_dims

Rotate = Callable[[Tensor, int], Tensor]


class SinkWindowKVCache(SequenceCache):
    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        sinks: int = 4,
        window: int = 1024,
        rotate: Rotate | None = None,
        batch_size: int = 1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        v_head_dim: int | None = None,
        max_rollback: int = 16,
    ) -> None:
        check_dims(n_layers=n_layers, n_kv_heads=n_kv_heads, head_dim=head_dim, batch_size=batch_size)
        if sinks < 0:
            raise KVCacheError(f"sinks must be >= 0, got {sinks}")
        if window < 1:
            raise KVCacheError(f"window must be >= 1 token, got {window}")
        if max_rollback < 0:
            raise KVCacheError(f"max_rollback must be >= 0, got {max_rollback}")
        if sinks and rotate is None:
            raise KVCacheError("a cache with sinks needs rotate(keys, delta) from the model to re-place them")
        self.n_layers, self.sinks, self.window, self.rotate = n_layers, sinks, window, rotate
        self.max_rollback = max_rollback
        cap = sinks + window + 16  # sinks, the ring, room for a forward's new tokens (grows)
        v_dim = v_head_dim or head_dim

        def buf(d: int) -> Tensor:
            return torch.zeros(batch_size, n_kv_heads, cap, d, dtype=dtype, device=device)

        self._k = [buf(head_dim) for _ in range(n_layers)]
        self._v = [buf(v_dim) for _ in range(n_layers)]
        self._sink_k = [torch.zeros(batch_size, n_kv_heads, sinks, head_dim, dtype=dtype, device=device)
                        for _ in range(n_layers)]  # fmt: skip
        # Undo records for the newest tokens: (slot, evicted k, evicted v per layer) or None (no eviction).
        self._undo: deque[tuple[int, list[Tensor], list[Tensor]] | None] = deque(maxlen=max_rollback)
        self._head = 0  # ring slot (0..window-1) of the oldest window token, once the ring is full
        self._len = 0

    def _room(self) -> int:
        return 1 << 62  # never full: old tokens leave the window

    def _held(self, seen: int) -> int:
        """Tokens held after `seen` tokens: sinks plus at most `window`."""
        return min(seen, self.sinks + self.window)

    def kv_length(self, t: int) -> int:
        return self._held(self._len) + t

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._k + self._v + self._sink_k)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        kb, vb = self._k[layer], self._v[layer]
        b, h, t, d = k.shape
        if (
            (b, h) != kb.shape[:2]
            or d != kb.shape[3]
            or v.shape[:3] != k.shape[:3]
            or v.shape[3] != vb.shape[3]
        ):
            raise KVCacheError(
                f"layer {layer}: keys {tuple(k.shape)} / values {tuple(v.shape)} do not fit a cache of "
                f"(batch, heads) = {tuple(kb.shape[:2])}, head dims {kb.shape[3]}/{vb.shape[3]}"
            )
        held, p = self._held(self._len), self._len
        end = held + t
        if end > kb.shape[2]:
            kb, vb = self._grow(layer, end)
        kb[:, :, held:end] = k
        vb[:, :, held:end] = v
        if p < self.sinks:  # the first tokens are the sinks: keep them as first rotated
            n = min(self.sinks, p + t) - p
            self._sink_k[layer][:, :, p : p + n] = k[:, :, :n]
        if self.sinks and p > self.sinks + self.window:
            # Tokens have left: the oldest window token sits at p - window; the sinks go just before it.
            delta = p - self.window - self.sinks
            kb[:, :, : self.sinks] = self.rotate(self._sink_k[layer], delta)  # type: ignore[misc]
        return kb[:, :, :end], vb[:, :, :end]

    def _grow(self, layer: int, need: int) -> tuple[Tensor, Tensor]:
        for bufs in (self._k, self._v):
            old = bufs[layer]
            new = old.new_zeros(old.shape[0], old.shape[1], max(need, 2 * old.shape[2]), old.shape[3])
            new[:, :, : old.shape[2]] = old
            bufs[layer] = new
        return self._k[layer], self._v[layer]

    def advance(self, n: int) -> None:
        if n < 0:
            raise KVCacheError(f"cannot advance by {n} tokens from {self._len}")
        held, full = self._held(self._len), self.sinks + self.window
        for i in range(n):  # token i of the forward sits at buffer index held + i
            src = held + i
            if src < full:  # still filling: it is where it belongs
                self._undo.append(None)
                continue
            slot = self.sinks + self._head
            keep = self.max_rollback > 0
            evicted_k = [kb[:, :, slot].clone() for kb in self._k] if keep else []
            evicted_v = [vb[:, :, slot].clone() for vb in self._v] if keep else []
            for kb, vb in zip(self._k, self._v, strict=True):
                kb[:, :, slot] = kb[:, :, src]
                vb[:, :, slot] = vb[:, :, src]
            self._undo.append((self._head, evicted_k, evicted_v))
            self._head = (self._head + 1) % self.window
        self._len += n

    def rollback(self, n: int) -> None:
        if not 0 <= n <= self._len:
            raise KVCacheError(f"cannot roll back {n} tokens; the cache holds {self._len}")
        if n > len(self._undo):
            raise KVCacheError(
                f"cannot roll back {n} tokens; this sink+window cache keeps the last {len(self._undo)} "
                f"(max_rollback={self.max_rollback})"
            )
        for _ in range(n):
            rec = self._undo.pop()
            if rec is not None:
                head, ek, ev = rec
                slot = self.sinks + head
                for kb, vb, k, v in zip(self._k, self._v, ek, ev, strict=True):
                    kb[:, :, slot] = k
                    vb[:, :, slot] = v
                self._head = head
            self._len -= 1

    def reset(self) -> None:
        super().reset()
        self._head = 0
        self._undo.clear()


class SinkWindowLatentKVCache(SinkWindowKVCache):
    """Latent attention's cache (see LatentKVCache) as sinks + window: `update(layer, latent, k_rope)`.
    Only the shared rotary key carries a position, so only it is re-rotated."""

    def __init__(self, n_layers: int, kv_lora_rank: int, rope_dim: int, **kwargs) -> None:
        super().__init__(n_layers, 1, rope_dim, v_head_dim=kv_lora_rank, **kwargs)

    def update(self, layer: int, latent: Tensor, k_rope: Tensor) -> tuple[Tensor, Tensor]:
        k_rope, latent = super().update(layer, k_rope, latent)
        return latent, k_rope
