"""Quantized KV caches: int8 per token, int4 in KIVI's layout, NF4.

Each layer keeps its keys and its values as two streams. A stream holds its oldest tokens as codes
with a scale and an offset per group, and its newest `residual` tokens in full precision. Reading a
layer dequantizes the coded part and appends the full-precision tail, so attention sees exactly what
the cache keeps, on every step.

Groups run one of two ways:
- per token: each token's vector is cut into groups of `group` channels (the whole head when group
  is None), each group with its own scale and offset. Values always; keys too for int8 and NF4.
- per channel: each channel of `group` consecutive tokens shares one scale and offset. KIVI (Liu et
  al. 2024) quantizes keys this way, since a few key channels carry most of the magnitude; tokens
  wait in the full-precision tail until a whole group of them can be coded.

Formats: int8 and int4 are asymmetric (code = round((x - min) / scale)); NF4 (Dettmers et al.
2023) maps x / absmax of its group to the nearest of 16 levels spaced as quantiles of a normal
distribution. 4-bit codes are packed two per byte. Scales and offsets are float16, as KIVI stores
them; arithmetic is float32.

Reading is what every decode step pays, since the whole coded part is decoded again. It decodes into
one float buffer for keys and one for values that all layers reuse (so `update`'s result holds until
the next `update`, and the float copy lives for one layer at a time, as torch.cat's did), an NF4 byte
through a 256-entry table to both its channels' levels, an int4 byte by shifting its nibbles apart,
then scales and offsets in place: the float32 operations of the plain formulation, bit for bit.

Rolling back moves the mark; the next write drops what lies beyond it, first returning a coded
group that the mark cuts into to full precision (its dequantized values: what attention already saw).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from omni_kv.calibration import KVCalibration
from omni_kv.protocol import CacheFullError, KVCacheError, SequenceCache, check_dims

Format = Literal["int8", "int4", "nf4"]
Axis = Literal["token", "channel"]

# The 16 NF4 levels of QLoRA (Dettmers et al. 2023, appendix E).
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])  # fmt: skip
_NF4_MIDPOINTS = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2


@dataclass(frozen=True)
class StreamSpec:
    """How one stream (keys or values) is coded."""

    format: Format = "int8"
    axis: Axis = "token"
    group: int | None = (
        None  # channels per group (axis token; None = the whole head) or tokens (axis channel)
    )
    residual: int = 0  # newest tokens kept in full precision

    def __post_init__(self) -> None:
        if self.format not in ("int8", "int4", "nf4"):
            raise KVCacheError(f"KV quantization format must be int8, int4 or nf4, got {self.format!r}")
        if self.axis not in ("token", "channel"):
            raise KVCacheError(f"KV quantization axis must be 'token' or 'channel', got {self.axis!r}")
        if self.format == "nf4" and self.axis == "channel":
            raise KVCacheError("NF4 groups run per token (absmax over channels), not per channel")
        if self.group is not None and self.group <= 0:
            raise KVCacheError(f"KV quantization group size must be positive, got {self.group}")
        if self.axis == "channel" and self.group is None:
            raise KVCacheError("per-channel KV quantization needs a group size (tokens per group)")
        if self.residual < 0:
            raise KVCacheError(f"the full-precision residual must be >= 0 tokens, got {self.residual}")

    @property
    def bits(self) -> int:
        return 8 if self.format == "int8" else 4

    def check_dim(self, dim: int) -> None:
        if self.axis == "token" and self.group is not None and dim % self.group:
            raise KVCacheError(
                f"KV quantization group size {self.group} does not divide the head dimension {dim}"
            )
        if self.bits == 4 and dim % 2:
            raise KVCacheError(f"4-bit KV codes pack channel pairs; head dimension {dim} is odd")


@dataclass(frozen=True)
class KVQuantConfig:
    """The coding of keys and of values; `int8()`, `kivi()` and `nf4()` build the usual ones."""

    keys: StreamSpec
    values: StreamSpec

    @classmethod
    def int8(cls, residual: int = 0) -> KVQuantConfig:
        s = StreamSpec("int8", "token", None, residual)
        return cls(s, s)

    @classmethod
    def kivi(cls, bits: int = 4, group: int = 32, residual: int = 128) -> KVQuantConfig:
        if bits not in (4, 8):
            raise KVCacheError(f"KIVI bits must be 4 or 8, got {bits}")
        fmt: Format = "int4" if bits == 4 else "int8"
        return cls(StreamSpec(fmt, "channel", group, residual), StreamSpec(fmt, "token", group, residual))

    @classmethod
    def nf4(cls, group: int = 64, residual: int = 128) -> KVQuantConfig:
        s = StreamSpec("nf4", "token", group, residual)
        return cls(s, s)


def quantize(x: Tensor, spec: StreamSpec) -> tuple[Tensor, Tensor, Tensor]:
    """x (B, H, T, D) float -> codes (B, H, T, D or D/2) uint8, scale and offset float16 of shape
    (B, H, T, D / group) per token or (B, H, T / group, D) per channel (NF4's offset is zero)."""
    b, h, t, d = x.shape
    x = x.float()
    if spec.axis == "token":
        g = spec.group or d
        xg = x.reshape(b, h, t, d // g, g)
        reduce = -1
    else:
        g = spec.group
        assert g is not None and t % g == 0
        xg = x.reshape(b, h, t // g, g, d)
        reduce = -2
    if spec.format == "nf4":
        absmax = xg.abs().amax(dim=reduce, keepdim=True).clamp_min(1e-8)
        scale = absmax.half()
        levels = xg / scale.float()
        codes = torch.bucketize(levels, _NF4_MIDPOINTS.to(x.device)).to(torch.uint8)
        offset = torch.zeros_like(scale)
    else:
        lo, hi = xg.amin(dim=reduce, keepdim=True), xg.amax(dim=reduce, keepdim=True)
        qmax = (1 << spec.bits) - 1
        scale = ((hi - lo) / qmax).clamp_min(1e-8).half()
        offset = lo.half()
        codes = ((xg - offset.float()) / scale.float()).round_().clamp_(0, qmax).to(torch.uint8)
    codes = codes.reshape(b, h, t, d)
    if spec.bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return codes, scale.squeeze(reduce), offset.squeeze(reduce)


def _pair_table(levels: Tensor) -> Tensor:
    """(256,) int64: entry b holds the float32 pair (levels[b & 15], levels[b >> 4]) as raw bits, so one
    gather decodes a packed byte into both of its channels (the values are moved, never computed on)."""
    b = torch.arange(256)
    return torch.stack((levels[b & 15], levels[b >> 4]), dim=1).contiguous().view(torch.int64).view(256)


_NF4_PAIRS = _pair_table(NF4_LEVELS)


def dequantize(codes: Tensor, scale: Tensor, offset: Tensor | None, spec: StreamSpec, dim: int,
               out: Tensor | None = None) -> Tensor:  # fmt: skip
    """The float32 (B, H, T, dim) that `quantize` coded, written into `out` when given (its rows must be
    contiguous, as in a slice of a (B, H, S, dim) buffer). Bit for bit `code * scale + offset` in float32
    (NF4: `level * scale`), as the plain formulation (codes times a float16 scale are exact in float32)."""
    b, h, t, _ = codes.shape
    if out is None:
        out = torch.empty(b, h, t, dim, device=codes.device)
    if spec.format == "nf4":  # one gather per head replaces unpacking plus the level lookup
        table = _NF4_PAIRS.to(codes.device)
        for i in range(b):
            for j in range(h):
                idx = codes[i, j].reshape(-1).int()  # (T * dim/2,) bytes
                torch.index_select(table, 0, idx, out=out[i, j].view(torch.int64).view(-1))
    elif spec.bits == 4:  # int4: byte hi << 4 | lo -> int16 hi << 8 | lo, i.e. bytes lo, hi (little-endian)
        w = codes.to(torch.int16)
        w.bitwise_or_(w << 4).bitwise_and_(0x0F0F)  # 2-3x faster than a table gather
        out.copy_(w.view(torch.uint8).view(b, h, t, dim))
    else:
        out.copy_(codes)  # int8 codes convert exactly
    if spec.axis == "token":
        g = spec.group or dim
        x, unsq = out.view(b, h, t, dim // g, g), -1
    else:
        g = spec.group
        assert g is not None
        x, unsq = out.view(b, h, t // g, g, dim), -2
    x.mul_(scale.float().unsqueeze(unsq))  # in place on a view: broadcast, no copies
    if spec.format != "nf4":
        assert offset is not None
        x.add_(offset.float().unsqueeze(unsq))
    return out


class _Stream:
    """One layer's keys or values: coded tokens [0, n_coded), full-precision tokens [n_coded, n)."""

    def __init__(self, spec: StreamSpec, batch: int, heads: int, dim: int, device,
                 channel_scale: Tensor | None = None) -> None:  # fmt: skip
        self.spec, self.dim = spec, dim
        # Calibrated divisors (heads, dim) applied before coding and undone after decoding.
        self.channel_scale = (
            None if channel_scale is None else channel_scale.float().to(device)[None, :, None, :]
        )
        self.shape = (batch, heads)
        self.device = device
        code_dim = dim if spec.bits == 8 else dim // 2
        self.codes = torch.zeros(batch, heads, 0, code_dim, dtype=torch.uint8, device=device)
        n_groups = dim // (spec.group or dim) if spec.axis == "token" else dim
        self.scale = torch.zeros(batch, heads, 0, n_groups, dtype=torch.float16, device=device)
        self.offset = None if spec.format == "nf4" else torch.zeros_like(self.scale)  # NF4: absmax only
        self.tail = torch.zeros(batch, heads, 0, dim, dtype=torch.float32, device=device)
        self.n_coded = 0  # tokens held as codes
        self.n_tail = 0  # tokens held in full precision after them
        # The tokens the last coding moved out of the tail (first index, full-precision values): a
        # rollback (speculative decoding) puts back those that plain writing would still hold in full.
        self._undo: tuple[int, Tensor] | None = None

    @property
    def n(self) -> int:
        return self.n_coded + self.n_tail

    def _scale_rows(self, tokens: int) -> int:
        return tokens if self.spec.axis == "token" else tokens // self.spec.group  # type: ignore[operator]

    def coded_at(self, n: int) -> int:
        """How many of n tokens writing holds as codes: all but the newest `residual`, in whole groups
        along the token axis for per-channel streams."""
        excess = n - self.spec.residual
        if self.spec.axis == "channel":
            excess = (excess // self.spec.group) * self.spec.group  # type: ignore[operator]
        return max(excess, 0)

    def truncate(self, n: int) -> None:
        """Keep the first n tokens, in the state writing n tokens leaves when the last coding's
        full-precision values cover what must return to the tail (a rollback after a write)."""
        if n >= self.n:
            return
        c = self.coded_at(n)
        if self._undo is not None and self._undo[0] <= c < self.n_coded:
            start, full = self._undo
            kept_tail = self.tail[:, :, : max(n - self.n_coded, 0)].clone()
            back = full[:, :, c - start : min(self.n_coded, n) - start]
            self.n_coded, self.n_tail, self._undo = c, 0, None
            self._append_tail(back)
            self._append_tail(kept_tail)
            return
        self._undo = None
        if n >= self.n_coded:
            self.n_tail = n - self.n_coded
            return
        # The mark cuts into the coded part: decode from the start of the group it falls in.
        keep = n if self.spec.axis == "token" else (n // self.spec.group) * self.spec.group  # type: ignore[operator]
        back = self.read_coded(keep, n)
        self.n_coded, self.n_tail = keep, 0
        self._append_tail(back)

    def read_coded(self, start: int, end: int) -> Tensor:
        """Coded tokens [start, end) dequantized; start falls on a group boundary."""
        stop = end
        if self.spec.axis == "channel":  # whole groups of tokens decode together
            g = self.spec.group
            assert g is not None
            stop = -(-end // g) * g
        r0, r1 = self._scale_rows(start), self._scale_rows(stop)
        offset = None if self.offset is None else self.offset[:, :, r0:r1]
        x = dequantize(self.codes[:, :, start:stop], self.scale[:, :, r0:r1], offset, self.spec, self.dim)
        if self.channel_scale is not None:
            x = x * self.channel_scale
        return x[:, :, : end - start]

    def _append_tail(self, x: Tensor) -> None:
        need = self.n_tail + x.shape[2]
        if need > self.tail.shape[2]:
            grown = self.tail.new_zeros(*self.shape, max(need, 2 * self.tail.shape[2], 16), self.dim)
            grown[:, :, : self.n_tail] = self.tail[:, :, : self.n_tail]
            self.tail = grown
        self.tail[:, :, self.n_tail : need] = x
        self.n_tail = need

    def _code(self, n: int) -> None:
        """Move the oldest n tail tokens into the coded part."""
        x = self.tail[:, :, :n]
        self._undo = (self.n_coded, x.clone())
        codes, scale, offset = quantize(
            x if self.channel_scale is None else x / self.channel_scale, self.spec
        )
        rows = self._scale_rows(self.n_coded)
        self.codes = _put(self.codes, self.n_coded, codes)
        self.scale = _put(self.scale, rows, scale)
        if self.offset is not None:
            self.offset = _put(self.offset, rows, offset)
        self.n_coded += n
        rest = self.tail[:, :, n : self.n_tail].clone()
        self.n_tail = 0
        self._append_tail(rest)

    def write(self, at: int, x: Tensor, out: Tensor) -> Tensor:
        """Store x (B, H, T, D) as tokens at.., code what leaves the residual; return all tokens, decoded
        into out (B, H, >= at + T, D), or a view of the tail while nothing is coded."""
        self.truncate(at)
        self._append_tail(x.float())
        excess = self.coded_at(self.n) - self.n_coded
        if excess > 0:
            self._code(excess)
        if not self.n_coded:
            return self.tail[:, :, : self.n_tail]
        nc, n = self.n_coded, self.n  # nc is whole groups here (per channel): no decoded token to drop
        rows = self._scale_rows(nc)
        offset = None if self.offset is None else self.offset[:, :, :rows]
        coded = dequantize(
            self.codes[:, :, :nc], self.scale[:, :, :rows], offset, self.spec, self.dim, out[:, :, :nc]
        )
        if self.channel_scale is not None:
            coded.mul_(self.channel_scale)
        out[:, :, nc:n] = self.tail[:, :, : self.n_tail]
        return out[:, :, :n]

    def nbytes(self) -> int:
        """Bytes the kept tokens take: codes, scales and offsets of the coded part, the float tail."""
        rows = self._scale_rows(self.n_coded)
        per_code = self.codes.shape[3]
        per_row = self.scale.shape[3] * 2 * (1 if self.offset is None else 2)
        b, h = self.shape
        return b * h * (self.n_coded * per_code + rows * per_row + self.n_tail * self.dim * 4)


def _put(buf: Tensor, at: int, x: Tensor) -> Tensor:
    """buf with x written at index `at` of dim 2, grown (doubling) when it is too short."""
    need = at + x.shape[2]
    if need > buf.shape[2]:
        grown = buf.new_zeros(buf.shape[0], buf.shape[1], max(need, 2 * buf.shape[2]), buf.shape[3])
        grown[:, :, :at] = buf[:, :, :at]
        buf = grown
    buf[:, :, at:need] = x
    return buf


class QuantizedKVCache(SequenceCache):
    """The KV cache protocol over quantized streams (see the module docstring)."""

    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        config: KVQuantConfig,
        *,
        batch_size: int = 1,
        max_len: int | None = None,
        device: torch.device | str = "cpu",
        v_head_dim: int | None = None,
        calibration: KVCalibration | None = None,
    ) -> None:
        """`calibration`: per-channel key statistics (omni_kv.calibration); keys coded per token are
        divided by its scales before coding. Per-channel (KIVI) keys do not need it."""
        check_dims(
            max_len, n_layers=n_layers, n_kv_heads=n_kv_heads, head_dim=head_dim, batch_size=batch_size
        )
        v_dim = v_head_dim or head_dim
        config.keys.check_dim(head_dim)
        config.values.check_dim(v_dim)
        self.config, self.n_layers, self.max_len = config, n_layers, max_len
        scales: list[Tensor | None] = [None] * n_layers
        if calibration is not None:
            calibration.check_model(n_layers, n_kv_heads, head_dim, "this cache")
            if config.keys.axis == "token":
                scales = [calibration.key_scales(i) for i in range(n_layers)]
        self._k = [
            _Stream(config.keys, batch_size, n_kv_heads, head_dim, device, scales[i]) for i in range(n_layers)
        ]
        self._v = [_Stream(config.values, batch_size, n_kv_heads, v_dim, device) for _ in range(n_layers)]
        self._out: list[Tensor | None] = [None, None]  # see _scratch
        self._len = 0

    def _room(self) -> int:
        return self.max_len if self.max_len is not None else 1 << 62

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, Hkv, T, Dh); return all keys and values (B, Hkv, S, Dh). They are views of
        buffers that the next `update` (of any layer) overwrites: attend before then, or clone them."""
        ks, vs = self._k[layer], self._v[layer]
        b, h, t, d = k.shape
        if (b, h) != ks.shape or d != ks.dim or v.shape[:3] != k.shape[:3] or v.shape[3] != vs.dim:
            raise KVCacheError(
                f"layer {layer}: keys {tuple(k.shape)} / values {tuple(v.shape)} do not fit a cache of "
                f"(batch, heads) = {ks.shape}, head dims {ks.dim}/{vs.dim}"
            )
        if self.max_len is not None and self._len + t > self.max_len:
            raise CacheFullError(f"cache holds at most {self.max_len} tokens; {self._len + t} were requested")
        n = self._len + t
        k_all = ks.write(self._len, k, self._scratch(0, ks, n))
        v_all = vs.write(self._len, v, self._scratch(1, vs, n))
        return k_all.to(k.dtype), v_all.to(v.dtype)

    def _scratch(self, i: int, stream: _Stream, n: int) -> Tensor:
        """Float (B, H, >= n, D) buffer that reads of keys (i = 0) or values (1) decode into: one for all
        layers, so the float copy lasts one layer as torch.cat's did; grown by doubling."""
        buf = self._out[i]
        if buf is None or buf.shape[2] < n:
            cap = n if buf is None else max(n, 2 * buf.shape[2])
            buf = self._out[i] = torch.empty(*stream.shape, cap, stream.dim, device=stream.device)
        return buf

    def reset(self) -> None:
        super().reset()
        for s in self._k + self._v:
            s.truncate(0)
        self._out = [None, None]

    def nbytes(self) -> int:
        """Bytes the cached tokens take now (codes, scales, offsets and full-precision tails)."""
        return sum(s.nbytes() for s in self._k + self._v)


def bytes_per_token(config: KVQuantConfig, n_layers: int, n_kv_heads: int, head_dim: int,
                    v_head_dim: int | None = None) -> float:  # fmt: skip
    """Bytes one coded token takes over all layers (keys and values, scales and offsets amortised
    over their groups; the full-precision residual not counted)."""

    def stream(spec: StreamSpec, d: int) -> float:
        per_group = 2 if spec.format == "nf4" else 4  # float16 scale (and offset)
        if spec.axis == "token":
            groups = d // (spec.group or d)
        else:
            groups = d / spec.group  # type: ignore[operator]
        return d * spec.bits / 8 + groups * per_group

    return (
        n_layers
        * n_kv_heads
        * (stream(config.keys, head_dim) + stream(config.values, v_head_dim or head_dim))
    )


class QuantizedLatentKVCache(QuantizedKVCache):
    """Latent attention's cache (see LatentKVCache) over quantized streams: `update(layer, latent,
    k_rope)` with the latent coded as keys are, the shared rotary key as values are."""

    def __init__(
        self, n_layers: int, kv_lora_rank: int, rope_dim: int, config: KVQuantConfig, *, batch_size: int = 1,
        max_len: int | None = None, device: torch.device | str = "cpu",
    ) -> None:  # fmt: skip
        super().__init__(n_layers, 1, kv_lora_rank, config, batch_size=batch_size, max_len=max_len, device=device,
                         v_head_dim=rope_dim)  # fmt: skip
