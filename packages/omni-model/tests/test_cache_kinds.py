"""Every cache kind of omni_kv through the decoder: quantized caches stay close to dense, the sink +
window cache equals attention over the tokens it keeps, placed contiguously (StreamingLLM)."""

from __future__ import annotations

import pytest
import torch

import omni_model
from omni_kv import CacheSpec, KVCacheError, SinkWindowKVCache

from .tiny import DEEPSEEK, VOCAB, save_tiny


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    save_tiny("llama", folder, head_dim=32, num_attention_heads=2, num_key_value_heads=1)
    return omni_model.load(folder, fuse=False).model


def tokens(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def decode(model, spec: CacheSpec | None, x: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits of every position: a prefill, then one token per forward."""
    cache = model.make_cache(spec=spec)
    with torch.no_grad():
        steps = [model(x[:, :prefill], cache=cache)]
        steps += [model(x[:, i : i + 1], cache=cache) for i in range(prefill, x.shape[1])]
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize(
    ("text", "tol"),
    [("int8", 0.05), ("kivi:group=16,residual=16", 0.25), ("kivi:bits=8,group=16,residual=0", 0.05),
     ("nf4:group=32,residual=16", 0.6), ("dense:dtype=float16", 0.02)],
)  # fmt: skip
def test_quantized_caches_stay_close_to_dense(llama, text, tol):
    x = tokens(100)
    dense = decode(llama, None, x, 40)
    got = decode(llama, CacheSpec.parse(text), x, 40)
    err = (got - dense).abs().max().item()
    assert 0 < err <= tol * dense.abs().max().item(), f"{text}: max |logits diff| {err:.3g}"


def test_sink_window_equals_dense_until_tokens_leave(llama):
    x = tokens(60)
    spec = CacheSpec("sink", sinks=4, window=60)
    assert torch.allclose(decode(llama, spec, x, 20), decode(llama, None, x, 20), atol=1e-5)


@pytest.mark.parametrize("sinks", [0, 3])
def test_sink_window_is_attention_over_the_kept_tokens_placed_contiguously(tmp_path, sinks):
    """One layer: its keys and values depend on the token and its position only, so a decode step
    through the cache must equal a fresh forward over [sinks, last window tokens, new token] at
    positions 0.. — what StreamingLLM defines."""
    save_tiny("llama", tmp_path, num_hidden_layers=1)
    model = omni_model.load(tmp_path, fuse=False).model
    window, n = 10, 40
    x = tokens(n, seed=1)
    cache = model.make_cache(spec=CacheSpec("sink" if sinks else "window", sinks=sinks, window=window))
    assert isinstance(cache, SinkWindowKVCache)
    with torch.no_grad():
        model(x[:, :8], cache=cache)
        for i in range(8, n):
            got = model(x[:, i : i + 1], cache=cache)[0, -1]
            kept = torch.cat([x[:, :sinks], x[:, max(sinks, i - window) : i + 1]], dim=1)
            want = model(kept)[0, -1]
            assert torch.allclose(got, want, atol=1e-4), f"step {i}"


def test_sink_window_rollback_restores_evicted_tokens(llama):
    x = tokens(50, seed=2)
    spec = CacheSpec("sink", sinks=2, window=12)
    a, b = llama.make_cache(spec=spec), llama.make_cache(spec=spec)
    with torch.no_grad():
        llama(x[:, :30], cache=a)
        llama(x[:, :30], cache=b)
        for i in range(30, 36):  # a: six more tokens, then takes them back
            llama(x[:, i : i + 1], cache=a)
        a.rollback(6)
        for i in range(36, 42):
            assert torch.equal(llama(x[:, i : i + 1], cache=a), llama(x[:, i : i + 1], cache=b))
    with pytest.raises(KVCacheError, match="keeps the last"):
        a.rollback(20)


def test_latent_attention_takes_quantized_caches(tmp_path):
    save_tiny("deepseek_v3", tmp_path)
    model = omni_model.load(tmp_path, fuse=False).model
    x = tokens(48)
    for mode in ("naive", "absorbed"):
        model.set_attention_mode(mode)
        dense = decode(model, None, x, 32)
        got = decode(model, CacheSpec.parse("int8"), x, 32)
        assert (got - dense).abs().max() <= 0.05 * dense.abs().max(), mode
    paged = CacheSpec.parse(f"paged:budget_bytes=8KiB,page_tokens=4,spill_dir={tmp_path}")
    assert torch.equal(decode(model, paged, x, 32), decode(model, None, x, 32))  # absorbed mode, last set
    assert DEEPSEEK["kv_lora_rank"] == 32


def test_latent_attention_takes_a_sink_window_cache(tmp_path):
    """Until tokens leave it equals dense; after, one layer's step equals a fresh forward over the kept
    tokens placed contiguously (as for grouped-query attention above)."""
    save_tiny("deepseek_v3", tmp_path, num_hidden_layers=1, first_k_dense_replace=1)
    model = omni_model.load(tmp_path, fuse=False).model
    x = tokens(36, seed=5)
    for mode in ("naive", "absorbed"):
        model.set_attention_mode(mode)
        assert torch.allclose(decode(model, CacheSpec("sink", sinks=2, window=40), x, 8), decode(model, None, x, 8),
                              atol=1e-5)  # fmt: skip
        cache = model.make_cache(spec=CacheSpec("sink", sinks=2, window=10))
        with torch.no_grad():
            model(x[:, :8], cache=cache)
            for i in range(8, 36):
                got = model(x[:, i : i + 1], cache=cache)[0, -1]
                kept = torch.cat([x[:, :2], x[:, max(2, i - 10) : i + 1]], dim=1)
                assert torch.allclose(got, model(kept)[0, -1], atol=1e-4), (mode, i)


def test_planner_and_parsing():
    dims = (30, 3, 64)  # SmolLM2-135M: layers, kv heads, head dim
    dense = CacheSpec()
    assert dense.bytes_per_token(*dims) == 30 * 3 * 128 * 4
    assert dense.kv_bytes(4096, *dims) == 4096 * 46080
    budget = 64 * 2**20
    n = dense.max_context(budget, *dims)
    assert dense.kv_bytes(n, *dims) <= budget < dense.kv_bytes(n + 1, *dims)
    kivi = CacheSpec.parse("kivi")
    assert kivi.max_context(budget, *dims) > 5 * n  # int4 codes: far longer contexts
    sink = CacheSpec.parse("sink:sinks=4,window=1024")
    assert sink.kv_bytes(100_000, *dims) == sink.kv_bytes(1028, *dims)
    for bad, what in [("paged2", "kind must be one of"), ("kivi:bits=3", "KIVI bits"), ("int8:foo=1", "foo=1"),
                      ("nf4:group=x", "not an integer"), ("kivi:group=0", "group size must be positive")]:  # fmt: skip
        with pytest.raises(KVCacheError, match=what):
            CacheSpec.parse(bad)
    with pytest.raises(KVCacheError, match="smaller than one token"):
        dense.max_context(1000, *dims)


def test_paged_cache_equals_dense_under_a_small_budget(llama, tmp_path):
    x = tokens(300, seed=3)
    spec = CacheSpec.parse(f"paged:budget_bytes=16KiB,page_tokens=8,spill_dir={tmp_path}")
    cache = llama.make_cache(spec=spec)
    assert cache.n_slots < 300 * 2 // 8  # far fewer resident pages than the sequence needs
    assert torch.equal(decode(llama, spec, x, 40), decode(llama, None, x, 40))


def test_calibration_round_trip_and_checks(llama, tmp_path):
    from omni_kv.calibration import KVCalibration, calibrate

    cal = calibrate(llama, tokens(200)[0], "tiny", context=64, chunk=16)
    assert cal.key_absmax.shape == (2, 1, 32) and bool((cal.key_absmax > 0).all())
    path = cal.save(tmp_path / "cal.json")
    again = KVCalibration.load(path)
    assert torch.equal(again.key_absmax, cal.key_absmax) and again.tokens == 200
    x = tokens(80, seed=4)
    dense = decode(llama, None, x, 30)
    got = decode(llama, CacheSpec.parse(f"nf4:group=32,residual=0,calibration={path}"), x, 30)
    assert (got - dense).abs().max() <= 0.6 * dense.abs().max()
    other = KVCalibration("other", 3, 1, 32, 10, torch.ones(3, 1, 32), torch.ones(3, 1, 32)).save(
        tmp_path / "o.json"
    )
    with pytest.raises(KVCacheError, match=r"has \(layers, kv heads, head dim\) = \(3, 1, 32\)"):
        llama.make_cache(spec=CacheSpec.parse(f"int8:calibration={other}"))
    bad = tmp_path / "bad.json"
    for text, what in [("{", "not a readable"), ('{"format": "x"}', "not a KV calibration"),
                       (path.read_text().replace('"tokens": 200', '"tokens": -1'), "tokens must be"),
                       (path.read_text().replace("[[[", "[[[-5, ", 1), "key_absmax is not a numeric array"),
                       (path.read_text().replace('"n_layers": 2', '"n_layers": 3'), "expected \\(3, 1, 32\\)")]:  # fmt: skip
        bad.write_text(text)
        with pytest.raises(KVCacheError, match=what):
            KVCalibration.load(bad)
    with pytest.raises(KVCacheError, match="applies to int8 and nf4"):
        CacheSpec.parse(f"kivi:calibration={path}")
