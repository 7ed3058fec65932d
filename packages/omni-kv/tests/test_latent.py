"""LatentKVCache: MLA's latents and rotary keys read back as written, across growth and rollback."""

from __future__ import annotations

import pytest
import torch

from omni_kv import CacheFullError, DenseKVCache, KVCache, KVCacheError, LatentKVCache


def latent(t: int, seed: int, b: int = 2, r: int = 16, p: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 1, t, r, generator=g), torch.randn(b, 1, t, p, generator=g)


@pytest.mark.parametrize("max_len", [None, 64])
def test_update_returns_everything_written(max_len):
    cache = LatentKVCache(2, 16, 4, batch_size=2, max_len=max_len)
    assert isinstance(cache, KVCache)
    seen_c, seen_k = [], []
    for step, t in enumerate([5, 1, 1, 300 if max_len is None else 7, 1]):
        c, k = latent(t, step)
        for layer in range(2):
            cs, ks = cache.update(layer, c + layer, k - layer)
        cache.advance(t)
        seen_c.append(c)
        seen_k.append(k)
        assert torch.equal(cs, torch.cat(seen_c, 2) + 1) and torch.equal(ks, torch.cat(seen_k, 2) - 1)
        joint = cache.joint(1)
        assert torch.equal(joint, torch.cat([cs, ks], dim=-1)[:, 0])
    assert cache.seq_len == sum([5, 1, 1, 300 if max_len is None else 7, 1])


def test_rollback_overwrites_rejected_tokens():
    cache = LatentKVCache(1, 16, 4, batch_size=1)
    c, k = latent(6, 0, b=1)
    cache.update(0, c, k)
    cache.advance(6)
    cache.rollback(2)
    c2, k2 = latent(2, 1, b=1)
    cs, ks = cache.update(0, c2, k2)
    cache.advance(2)
    assert torch.equal(cs, torch.cat([c[:, :, :4], c2], 2)) and torch.equal(
        ks, torch.cat([k[:, :, :4], k2], 2)
    )
    cache.reset()
    assert cache.seq_len == 0


def test_errors_are_typed():
    with pytest.raises(KVCacheError, match="kv_lora_rank=0"):
        LatentKVCache(1, 0, 4)
    with pytest.raises(KVCacheError, match="max_len"):
        LatentKVCache(1, 16, 4, max_len=0)
    cache = LatentKVCache(1, 16, 4, batch_size=2, max_len=4)
    with pytest.raises(KVCacheError, match="do not fit"):
        cache.update(0, *latent(2, 0, r=8))
    with pytest.raises(KVCacheError, match="do not fit"):
        cache.update(0, torch.zeros(2, 16), torch.zeros(2, 4))
    with pytest.raises(CacheFullError, match="at most 4"):
        cache.update(0, *latent(5, 0))
    with pytest.raises(KVCacheError, match="roll back"):
        cache.rollback(1)


def test_a_latent_token_costs_far_less_than_dense_keys_and_values():
    # DeepSeek-V3's attention shape: 128 heads of 192/128 dims against a 512 + 64 latent.
    dense = DenseKVCache(1, 128, 192, v_head_dim=128, max_len=8)
    mla = LatentKVCache(1, 512, 64, max_len=8)
    assert mla.bytes_per_token() == (512 + 64) * 4 and mla.nbytes() == 8 * (512 + 64) * 4
    assert dense.bytes_per_token() == dense.nbytes() // 8 == 128 * (192 + 128) * 4
    assert dense.bytes_per_token() / mla.bytes_per_token() > 71
