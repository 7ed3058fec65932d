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


def check_dims(max_len: int | None = None, **dims: int) -> None:
    """One-line errors for cache sizes: every named dimension positive, max_len None or positive."""
    if min(dims.values()) <= 0:
        got = ", ".join(f"{k}={v}" for k, v in dims.items())
        raise KVCacheError(f"cache dimensions must be positive, got {got}")
    if max_len is not None and max_len <= 0:
        raise KVCacheError(f"max_len must be positive, got {max_len}")


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

    def kv_length(self, t: int) -> int:
        """How many keys the next update of t new tokens returns (seq_len + t unless tokens leave)."""
        ...

    def reset(self) -> None:
        """Forget every token."""
        ...


class SequenceCache:
    """The position bookkeeping every cache kind shares: `seq_len`, `advance`, `rollback`, `reset`.

    A subclass sets `_len = 0` and says, through `_room()`, how many tokens its smallest layer
    buffer holds; rolling back only moves the mark (the next writes overwrite the rejected tokens).
    """

    _len: int

    def _room(self) -> int:
        raise NotImplementedError

    @property
    def seq_len(self) -> int:
        return self._len

    def kv_length(self, t: int) -> int:
        return self._len + t

    def advance(self, n: int) -> None:
        if n < 0 or self._len + n > self._room():
            raise KVCacheError(f"cannot advance by {n} tokens from {self._len}")
        self._len += n

    def rollback(self, n: int) -> None:
        if not 0 <= n <= self._len:
            raise KVCacheError(f"cannot roll back {n} tokens; the cache holds {self._len}")
        self._len -= n

    def reset(self) -> None:
        self._len = 0
