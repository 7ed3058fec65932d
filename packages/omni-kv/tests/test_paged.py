"""PagedKVCache on a budget of a few pages: reads equal a dense cache's, across spills and rollback."""

from __future__ import annotations

import pytest
import torch

from omni_kv.dense import DenseKVCache
from omni_kv.paged import PagedKVCache
from omni_kv.protocol import KVCache, KVCacheError


@pytest.fixture(autouse=True)
def one_thread():
    # The copies here are a few hundred KB: on a busy 2-core machine a second intra-op thread only
    # spins waiting for a core, and the long decode goes from seconds to minutes.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def page_bytes(b: int, h: int, d: int, page_tokens: int, dv: int | None = None, itemsize: int = 4) -> int:
    return b * h * page_tokens * (d + (dv or d)) * itemsize


def step_both(paged: PagedKVCache, dense: DenseKVCache, t: int, g: torch.Generator) -> None:
    """Write the same random t tokens to every layer of both caches and check what comes back."""
    b, h, dk, dv = paged._bhd
    for layer in range(paged.n_layers):
        k = torch.randn(b, h, t, dk, generator=g).to(paged.dtype)
        v = torch.randn(b, h, t, dv, generator=g).to(paged.dtype)
        pk, pv = paged.update(layer, k, v)
        dk_, dv_ = dense.update(layer, k, v)
        assert pk.is_contiguous() and pv.is_contiguous()
        assert torch.equal(pk, dk_) and torch.equal(pv, dv_), f"layer {layer} at position {paged.seq_len}"
    paged.advance(t)
    dense.advance(t)


def test_long_decode_matches_dense_under_a_budget_of_a_few_pages():
    n_layers, b, h, d, pt = 3, 2, 2, 8, 32
    budget = 5 * page_bytes(b, h, d, pt)
    g = torch.Generator().manual_seed(0)
    with PagedKVCache(n_layers, h, d, batch_size=b, page_tokens=pt, budget_bytes=budget) as paged:
        assert isinstance(paged, KVCache)
        dense = DenseKVCache(n_layers, h, d, batch_size=b)
        for t in [100] + [1] * 3000:
            step_both(paged, dense, t, g)
            assert paged.stats.resident_bytes <= budget
        s = paged.stats
        assert paged.seq_len == 3100
        assert s.resident_pages == paged.n_slots == 5
        assert s.resident_pages + s.spilled_pages == n_layers * -(-3100 // pt)
        assert s.evictions > 0 and s.page_faults > 0 and s.writebacks > 0 and s.prefetch_hints > 0
        # Only pages written since they were loaded go back to the file: far fewer writes than evictions.
        assert s.writebacks < s.evictions / 2
        assert s.file_bytes >= s.spilled_pages * paged.page_bytes
        assert paged.nbytes() == 5 * paged.page_bytes <= budget
        assert paged.bytes_per_token() == dense.bytes_per_token()
        assert paged.transient_bytes(3100) >= 3100 * paged.bytes_per_token() // n_layers


def test_budget_that_holds_everything_never_touches_the_file():
    b, h, d, pt = 1, 2, 8, 16
    g = torch.Generator().manual_seed(1)
    with PagedKVCache(2, h, d, page_tokens=pt, budget_bytes=2 * 20 * page_bytes(b, h, d, pt)) as paged:
        dense = DenseKVCache(2, h, d)
        for t in [37] + [1] * 200:
            step_both(paged, dense, t, g)
        assert paged.stats.page_faults == paged.stats.evictions == paged.stats.file_bytes == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_value_dim_other_than_key_dim(dtype):
    g = torch.Generator().manual_seed(2)
    kw = dict(batch_size=2, v_head_dim=4, dtype=dtype)
    budget = 3 * page_bytes(2, 1, 8, 4, dv=4, itemsize=dtype.itemsize)
    with PagedKVCache(2, 1, 8, page_tokens=4, budget_bytes=budget, **kw) as paged:
        dense = DenseKVCache(2, 1, 8, **kw)
        for t in [9, 3] + [1] * 100 + [13]:
            step_both(paged, dense, t, g)
        assert paged.stats.page_faults > 0


def test_rollback_into_spilled_pages_then_rewrite():
    b, h, d, pt = 2, 2, 4, 4
    g = torch.Generator().manual_seed(3)
    budget = 2 * page_bytes(b, h, d, pt)
    with PagedKVCache(2, h, d, batch_size=b, page_tokens=pt, budget_bytes=budget) as paged:
        dense = DenseKVCache(2, h, d, batch_size=b)
        for t in [10] + [1] * 20:
            step_both(paged, dense, t, g)
        # 30 tokens: layer 1's last two pages fill the pool, so every page of layer 0 is in the file.
        assert paged._table[0][1] < 0
        faults = paged.stats.page_faults
        for cache in (paged, dense):
            cache.rollback(23)  # to position 7: mid page 1, across pages 2..7
        step_both(paged, dense, 3, g)  # rewrites the end of page 1 (read back first) and starts page 2
        assert paged.stats.page_faults > faults
        for t in [1] * 6:
            step_both(paged, dense, t, g)
        for cache in (paged, dense):
            cache.rollback(4)  # 16 -> 12: exactly on a page boundary
        step_both(paged, dense, 6, g)
        for t in [1] * 9:
            step_both(paged, dense, t, g)
        # At 27 tokens layer 0's part-filled last page is in the file: an empty update reads it from
        # there and brings it into the pool, and the next token is written into it.
        assert paged._table[0][6] < 0
        for t in [0, 1, 1]:
            step_both(paged, dense, t, g)
        for cache in (paged, dense):
            cache.reset()
        step_both(paged, dense, 9, g)
        assert paged.seq_len == 9


def test_bad_page_size_and_budget_name_the_value():
    with pytest.raises(KVCacheError, match="page_tokens must be positive, got 0"):
        PagedKVCache(2, 2, 8, page_tokens=0, budget_bytes=1 << 20)
    two_pages = 2 * page_bytes(1, 2, 8, 16)
    with pytest.raises(KVCacheError, match=f"budget_bytes={two_pages - 1} is below the 2 pages"):
        PagedKVCache(2, 2, 8, page_tokens=16, budget_bytes=two_pages - 1)
    PagedKVCache(2, 2, 8, page_tokens=16, budget_bytes=two_pages).close()
    # 8 layers, 1-token pages: two pages fit in the budget, one token of all layers does not.
    with pytest.raises(KVCacheError, match="budget_bytes=320 is below one token's cache over all layers"):
        PagedKVCache(8, 2, 8, page_tokens=1, budget_bytes=320)
    with PagedKVCache(1, 2, 8, page_tokens=4, budget_bytes=1 << 12) as cache:
        with pytest.raises(KVCacheError, match="do not fit"):
            cache.update(0, torch.zeros(1, 3, 1, 8), torch.zeros(1, 3, 1, 8))
        with pytest.raises(KVCacheError, match="layer 1 is out of range"):
            cache.update(1, torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 1, 8))
    with pytest.raises(KVCacheError, match="closed"):
        cache.update(0, torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 1, 8))


def fill(cache: PagedKVCache, tokens: int) -> None:
    for _ in range(tokens):
        for layer in range(cache.n_layers):
            cache.update(layer, torch.ones(1, 2, 1, 8), torch.ones(1, 2, 1, 8))
        cache.advance(1)


def test_close_removes_the_spill_file(tmp_path):
    budget = 2 * page_bytes(1, 2, 8, 4)
    cache = PagedKVCache(2, 2, 8, page_tokens=4, budget_bytes=budget, spill_dir=tmp_path)
    assert cache.spill_path.parent == tmp_path
    fill(cache, 40)
    assert cache.stats.spilled_pages > 0
    assert cache.spill_path.stat().st_size == cache.stats.file_bytes > 0
    cache.close()
    cache.close()
    assert not cache.spill_path.exists() and tmp_path.is_dir()

    with PagedKVCache(2, 2, 8, page_tokens=4, budget_bytes=budget) as cache:
        fill(cache, 40)
        tmp_dir = cache.spill_path.parent
        assert cache.spill_path.exists()
    assert not tmp_dir.exists()
