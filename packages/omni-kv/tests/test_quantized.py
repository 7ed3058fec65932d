"""QuantizedKVCache: codes within their rounding bound, the fast decode bit for bit the plain one, exact
full-precision tails, the same answer however the tokens arrive, rollback, bytes, and one-line errors
for bad settings."""

from __future__ import annotations

import pytest
import torch

from omni_kv import KVCache, KVCacheError, KVQuantConfig, QuantizedKVCache, StreamSpec
from omni_kv.calibration import KVCalibration
from omni_kv.quantized import NF4_LEVELS, bytes_per_token, dequantize, quantize

CONFIGS = {
    "int8": KVQuantConfig.int8(),
    "int8-residual": KVQuantConfig.int8(residual=5),
    "kivi4": KVQuantConfig.kivi(bits=4, group=8, residual=16),
    "kivi8": KVQuantConfig.kivi(bits=8, group=4, residual=0),
    "nf4": KVQuantConfig.nf4(group=16, residual=0),
}


def kv(t: int, seed: int, b: int = 2, h: int = 3, d: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, h, t, d, generator=g)
    k[..., 3] *= 20  # an outlier channel, as real keys have
    return k, torch.randn(b, h, t, d, generator=g)


@pytest.mark.parametrize("spec", [StreamSpec("int8"), StreamSpec("int4", "token", 8), StreamSpec("int4", "channel", 4),
                                  StreamSpec("int8", "channel", 8), StreamSpec("nf4", "token", 16)])  # fmt: skip
def test_codes_stay_within_their_rounding_bound(spec):
    x = kv(16, 0)[0]
    codes, scale, offset = quantize(x, spec)
    back = dequantize(codes, scale, None if spec.format == "nf4" else offset, spec, x.shape[-1])
    if spec.axis == "token":
        g = spec.group or x.shape[-1]
        step = scale.float().repeat_interleave(g, dim=-1)
    else:
        step = scale.float().repeat_interleave(spec.group, dim=-2)
    if spec.format == "nf4":  # nearest level: at most half the widest gap between levels, times absmax
        bound = step * float((NF4_LEVELS[1:] - NF4_LEVELS[:-1]).max()) / 2
    else:  # half a step, plus float16's rounding of the scale and offset over the group's range
        bound = step * (0.5 + (2**spec.bits) * 2**-10) + x.abs() * 2**-10
    assert ((back - x).abs() <= bound + 1e-6).all()


def plain_dequantize(codes, scale, offset, spec, dim):
    """The straightforward decode the fast path must equal bit for bit: unpack nibbles with stack, look
    NF4 levels up, then code * scale + offset in float32."""
    b, h, t, _ = codes.shape
    if spec.bits == 4:
        codes = torch.stack((codes & 15, codes >> 4), dim=-1).reshape(b, h, t, dim)
    if spec.axis == "token":
        g = spec.group or dim
        c, u = codes.reshape(b, h, t, dim // g, g), -1
    else:
        c, u = codes.reshape(b, h, t // spec.group, spec.group, dim), -2
    if spec.format == "nf4":
        x = NF4_LEVELS[c.long()] * scale.float().unsqueeze(u)
    else:
        x = c.float() * scale.float().unsqueeze(u) + offset.float().unsqueeze(u)
    return x.reshape(b, h, t, dim)


SPECS = [StreamSpec("int8"), StreamSpec("int8", "token", 8), StreamSpec("int8", "channel", 8),
         StreamSpec("int4", "token", 8), StreamSpec("int4", "channel", 4), StreamSpec("nf4"), StreamSpec("nf4", "token", 16)]  # fmt: skip


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("source", ["quantized", "random"])
def test_fast_dequantize_is_the_plain_one_bit_for_bit(spec, source):
    x = kv(32, 4)[0]
    codes, scale, offset = quantize(x, spec)
    if source == "random":  # every byte value, scales and offsets over float16's range
        g = torch.Generator().manual_seed(5)
        codes = torch.randint(0, 256, codes.shape, generator=g, dtype=torch.uint8)
        scale = (
            torch.randn(scale.shape, generator=g) * 10 ** torch.randint(-4, 4, scale.shape, generator=g)
        ).half()
        offset = (torch.randn(offset.shape, generator=g) * 100).half()
    offset = None if spec.format == "nf4" else offset
    want = plain_dequantize(codes, scale, offset, spec, 32)
    assert torch.equal(dequantize(codes, scale, offset, spec, 32), want)
    buf = torch.full((2, 3, 40, 32), float("nan"))  # into the front of a longer buffer, as the cache reads
    dequantize(codes, scale, offset, spec, 32, out=buf[:, :, :32])
    assert torch.equal(buf[:, :, :32], want) and buf[:, :, 32:].isnan().all()


@pytest.mark.parametrize("name", [*sorted(CONFIGS), "int8-calibrated", "nf4-calibrated"])
def test_cache_returns_the_plain_decode_of_its_codes_then_the_tail(name):
    """Token by token over two layers (which share the read buffers): the coded tokens read back as the
    plain decode of the whole prefix coded at once (groups align, so that codes them alike)."""
    cfg = CONFIGS[name.removesuffix("-calibrated")]
    cal = None
    if name.endswith("-calibrated"):
        cal = KVCalibration("t", 2, 3, 32, 1, torch.rand(2, 3, 32) + 0.1, torch.ones(2, 3, 32))
    cache = QuantizedKVCache(2, 3, 32, cfg, batch_size=2, calibration=cal)
    k, v = kv(60, 6)

    def want(x, spec, div):
        nc = max(0, x.shape[2] - spec.residual)
        nc -= nc % spec.group if spec.axis == "channel" else 0
        back = plain_dequantize(*quantize(x[:, :, :nc] / div, spec), spec, 32) * div
        return torch.cat([back, x[:, :, nc:]], dim=2)

    for s, t in [(0, 20), *((i, 1) for i in range(20, 60))]:
        for layer in range(2):
            kl, vl = k[:, :, : s + t] + layer, v[:, :, : s + t] - layer
            got_k, got_v = cache.update(layer, kl[:, :, s:], vl[:, :, s:])
            div = torch.ones(()) if cal is None else cal.key_scales(layer)[None, :, None, :]
            assert torch.equal(got_k, want(kl, cfg.keys, div)), (s, layer)
            assert torch.equal(got_v, want(vl, cfg.values, torch.ones(()))), (s, layer)
        cache.advance(t)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_tail_is_exact_and_arrival_order_does_not_matter(name):
    cfg = CONFIGS[name]
    whole = QuantizedKVCache(2, 3, 32, cfg, batch_size=2)
    stepped = QuantizedKVCache(2, 3, 32, cfg, batch_size=2)
    assert isinstance(whole, KVCache)
    k, v = kv(45, 1)
    ks_whole, vs_whole = whole.update(0, k, v)
    whole.advance(45)
    for s, t in [(0, 9), (9, 1), (10, 17), (27, 1), (28, 1), (29, 16)]:
        ks, vs = stepped.update(0, k[:, :, s : s + t], v[:, :, s : s + t])
        stepped.advance(t)
    assert torch.equal(ks, ks_whole) and torch.equal(vs, vs_whole)
    r = cfg.values.residual
    if r:
        assert torch.equal(vs[:, :, -r:], v[:, :, -r:])  # the newest tokens in full precision
    assert (ks - k).abs().max() > 0 or cfg.keys.residual >= 45  # something was coded


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_rollback_then_rewrite(name):
    cfg = CONFIGS[name]
    cache = QuantizedKVCache(1, 3, 32, cfg, batch_size=2)
    k, v = kv(40, 2)
    seen_k = cache.update(0, k, v)[0].clone()  # the next update reuses the buffers
    cache.advance(40)
    cache.rollback(7)
    k2, v2 = kv(3, 3)
    ks, vs = cache.update(0, k2, v2)
    cache.advance(3)
    assert cache.seq_len == 36 and ks.shape[2] == 36
    # A rollback after a write leaves the state that writing only the kept tokens leaves (what the last
    # write coded and plain writing would still hold in full precision goes back to the tail).
    ref = QuantizedKVCache(1, 3, 32, cfg, batch_size=2)
    ref.update(0, k[:, :, :33], v[:, :, :33])
    ref.advance(33)
    rk, rv = ref.update(0, k2, v2)
    assert torch.equal(ks, rk) and torch.equal(vs, rv)
    assert torch.allclose(ks[:, :, :33], seen_k[:, :, :33], atol=0.2 * k.abs().max().item())
    # Without the last write's values (a second rollback reaches further back) the cut group comes
    # back as attention saw it, its decoded values.
    cache.rollback(10)
    ks, _ = cache.update(0, k2, v2)
    assert torch.allclose(ks[:, :, :26], seen_k[:, :, :26], atol=0.2 * k.abs().max().item())
    cache.reset()
    assert cache.seq_len == 0 and cache.nbytes() == 0


def test_bytes_per_token_counts_codes_and_group_metadata():
    d, layers, heads = 64, 30, 3
    dense = layers * heads * d * 2 * 4
    int8 = bytes_per_token(KVQuantConfig.int8(), layers, heads, d)
    assert int8 == layers * heads * 2 * (d + 4)
    kivi = bytes_per_token(KVQuantConfig.kivi(4, 32, 128), layers, heads, d)
    assert kivi == layers * heads * ((d / 2 + d * 4 / 32) + (d / 2 + 2 * 4))
    assert dense / int8 > 3.5 and dense / kivi > 5
    cache = QuantizedKVCache(layers, heads, d, KVQuantConfig.int8(), batch_size=1)
    for layer in range(layers):
        cache.update(layer, *kv(10, layer, b=1, d=d))
    cache.advance(10)
    assert cache.nbytes() == 10 * int8


@pytest.mark.parametrize(
    ("make", "what"),
    [
        (lambda: StreamSpec("int3"), "int8, int4 or nf4"),
        (lambda: StreamSpec("int4", "token", 0), "group size must be positive"),
        (lambda: StreamSpec("int4", "channel", None), "needs a group size"),
        (lambda: StreamSpec("nf4", "channel", 8), "per token"),
        (lambda: KVQuantConfig.kivi(bits=3), "KIVI bits"),
        (lambda: QuantizedKVCache(1, 1, 30, KVQuantConfig.nf4(group=16)), "16 does not divide the head dimension 30"),
        (lambda: StreamSpec("int8", residual=-1), "residual"),
    ],
)  # fmt: skip
def test_bad_settings_are_one_line_errors(make, what):
    with pytest.raises(KVCacheError, match=what):
        make()
