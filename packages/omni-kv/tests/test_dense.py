"""DenseKVCache: what a layer writes is what it reads back, across growth, rollback and reset."""

from __future__ import annotations

import pytest
import torch

from omni_kv import CacheFullError, DenseKVCache, KVCache, KVCacheError


def kv(t: int, seed: int, b: int = 2, h: int = 3, d: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, t, d, generator=g), torch.randn(b, h, t, d, generator=g)


@pytest.mark.parametrize("max_len", [None, 64])
def test_update_returns_everything_written(max_len):
    cache = DenseKVCache(2, 3, 8, batch_size=2, max_len=max_len)
    assert isinstance(cache, KVCache)
    written_k, written_v = [], []
    for step, t in enumerate([5, 1, 1, 7, 1]):
        k, v = kv(t, step)
        for layer in range(2):
            ks, vs = cache.update(layer, k + layer, v - layer)
        cache.advance(t)
        written_k.append(k)
        written_v.append(v)
        assert torch.equal(ks, torch.cat(written_k, 2) + 1)
        assert torch.equal(vs, torch.cat(written_v, 2) - 1)
    assert cache.seq_len == 15


def test_growing_cache_keeps_old_tokens_across_reallocation():
    cache = DenseKVCache(1, 1, 4, batch_size=1)
    start_cap = cache.capacity
    k, v = kv(start_cap + 3, 0, b=1, h=1, d=4)
    ks, vs = cache.update(0, k, v)
    cache.advance(k.shape[2])
    assert cache.capacity >= start_cap + 3
    assert torch.equal(ks, k) and torch.equal(vs, v)


def test_full_cache_raises():
    cache = DenseKVCache(1, 3, 8, batch_size=2, max_len=4)
    cache.update(0, *kv(4, 0))
    cache.advance(4)
    with pytest.raises(CacheFullError, match="at most 4"):
        cache.update(0, *kv(1, 1))


def test_rollback_overwrites_rejected_tokens():
    cache = DenseKVCache(1, 3, 8, batch_size=2, max_len=16)
    k1, v1 = kv(6, 0)
    cache.update(0, k1, v1)
    cache.advance(6)
    cache.rollback(2)
    assert cache.seq_len == 4
    k2, v2 = kv(1, 1)
    ks, _ = cache.update(0, k2, v2)
    cache.advance(1)
    assert torch.equal(ks, torch.cat([k1[:, :, :4], k2], 2))
    with pytest.raises(KVCacheError, match="roll back 9"):
        cache.rollback(9)
    cache.reset()
    assert cache.seq_len == 0


def test_bad_shapes_and_sizes_are_typed_errors():
    with pytest.raises(KVCacheError, match="positive"):
        DenseKVCache(0, 3, 8)
    with pytest.raises(KVCacheError, match="max_len"):
        DenseKVCache(1, 3, 8, max_len=0)
    cache = DenseKVCache(1, 3, 8, batch_size=2)
    with pytest.raises(KVCacheError, match="do not fit"):
        cache.update(0, *kv(1, 0, h=4))
    with pytest.raises(KVCacheError, match="advance"):
        cache.advance(-1)


def test_nbytes_counts_allocated_buffers():
    cache = DenseKVCache(2, 3, 8, batch_size=1, max_len=10, dtype=torch.float16)
    assert cache.nbytes() == 2 * 2 * (3 * 10 * 8) * 2
