"""The protocol every KV cache implements.

A forward over T new tokens starts at position `cache.seq_len`; each attention layer hands its new
keys/values (B, Hkv, T, Dh) to `update` and attends over what it gets back (B, Hkv, S, Dh), S being
the cached tokens plus the new ones. After the last layer the decoder calls `advance(T)`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor


class KVCacheError(ValueError):
    """A cache was used in a way it cannot serve (wrong shapes, out of room, bad rollback)."""


class CacheFullError(KVCacheError):
    """The cache has no room for the tokens being added."""


@runtime_checkable
class KVCache(Protocol):
    @property
    def seq_len(self) -> int:
        """Tokens committed so far: the position of the next token."""
        ...

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, Hkv, T, Dh) for `layer` after `seq_len`; return all keys/values (B, Hkv, S, Dh)."""
        ...

    def advance(self, n: int) -> None:
        """Commit n tokens written by the layers of one forward."""
        ...

    def rollback(self, n: int) -> None:
        """Forget the last n committed tokens."""
        ...

    def reset(self) -> None:
        """Forget every token."""
        ...
