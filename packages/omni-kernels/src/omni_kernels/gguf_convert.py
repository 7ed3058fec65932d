"""GGUF Q4_0, Q4_1 and Q8_0 weights to MatMulNBits' layout (omni_kernels.quant) without quantizing twice.

Input is a tensor's raw blocks as gguf.GGUFReader exposes them: uint8 (N, K / 32 * block bytes) for a weight
(N, K), and its GGMLQuantizationType. Each 32-element block carries an fp16 scale d:
- Q4_0 (value = (code - 8) * d) -> 4-bit, block 32, symmetric. GGUF puts element j in the low nibble and
  element j + 16 in the high nibble of byte j; MatMulNBits wants consecutive pairs, so nibbles are reordered.
- Q8_0 (value = q * d, q int8) -> 8-bit, block 32, symmetric: code = q + 128, MatMulNBits' implicit zero point.
- Q4_1 (value = code * d + m) -> 4-bit, block 32, zero point -m / d. Bit-exact with uint8 zero points only when
  every block's -m / d is an integer in 0..15 (never for llama.cpp's min-based quantizer). Otherwise the zero
  points are float32, which ORT's CPU kernel takes for 4 bits and computes as code * d + (-d * zp): equal to
  GGUF's value wherever -d * fl(-m / d) rounds back to m (about 91% of blocks of random weights), else off by
  one float32 ulp of m. Float zero points put ORT on its unpacked path (all of B dequantized per call).
  gguf_q4_1_split is exact and keeps the packed path: codes with zero point 0 and scale d, plus the block
  minimums m, to add as blocksum(A) @ m.T.
All three are bit-exact (Q4_1 where stated): dequantize() equals gguf.quants.dequantize.
"""

import numpy as np

from omni_kernels.errors import KernelError
from omni_kernels.quant import PackedWeight, _pack_nibbles

__all__ = ["GGUF_TYPES", "gguf_q4_1_split", "gguf_to_packed"]

# GGMLQuantizationType values; the gguf package is omni-model's dependency, and these three never change.
Q4_0, Q4_1, Q8_0 = 2, 3, 8
GGUF_TYPES = {Q4_0: "Q4_0", Q4_1: "Q4_1", Q8_0: "Q8_0"}
_BLOCK = 32
_BLOCK_BYTES = {Q4_0: 18, Q4_1: 20, Q8_0: 34}


def _blocks(data: np.ndarray, qtype: int) -> np.ndarray:
    if qtype not in GGUF_TYPES:
        raise KernelError(
            f"qtype must be one of {sorted(GGUF_TYPES.values())} ({sorted(GGUF_TYPES)}), got {qtype!r}"
        )
    nbytes = _BLOCK_BYTES[qtype]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise KernelError(f"data must be uint8 (N, row bytes) as GGUFReader gives it, got {desc}")
    if data.shape[0] == 0 or data.shape[1] == 0 or data.shape[1] % nbytes:
        raise KernelError(
            f"{GGUF_TYPES[qtype]} rows must be a positive multiple of {nbytes} bytes, got {data.shape}"
        )
    return np.ascontiguousarray(data).reshape(data.shape[0], -1, nbytes)  # (N, kb, block bytes)


def _fp16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)  # (N, kb)


def _q4_codes(qs: np.ndarray) -> np.ndarray:
    # qs (N, kb, 16): byte j holds elements j (low) and j + 16 (high); returns codes (N, kb, 32) in order
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _pack_pairs(codes: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(codes[..., 0::2] | (codes[..., 1::2] << 4))


def gguf_to_packed(data: np.ndarray, qtype: int) -> PackedWeight:
    """A GGUF Q4_0 / Q4_1 / Q8_0 weight's raw blocks (N, row bytes) as a PackedWeight, codes unchanged."""
    b = _blocks(data, qtype)
    n, kb, _ = b.shape
    d = _fp16(b[..., 0:2])
    if qtype == Q8_0:
        codes = b[..., 2:] ^ np.uint8(0x80)  # int8 q + 128 as uint8
        return PackedWeight(np.ascontiguousarray(codes), d, None, 8, _BLOCK, kb * _BLOCK, n)
    if qtype == Q4_0:
        return PackedWeight(_pack_pairs(_q4_codes(b[..., 2:])), d, None, 4, _BLOCK, kb * _BLOCK, n)
    m = _fp16(b[..., 2:4])
    codes = _q4_codes(b[..., 4:])
    zp = np.divide(-m.astype(np.float64), d, out=np.full(d.shape, np.nan), where=d != 0)
    if np.all(((zp == np.round(zp)) & (zp >= 0) & (zp <= 15)) | ((d == 0) & (m == 0))):
        zp = np.nan_to_num(zp).astype(np.uint8)  # exact: m = -zp * d, and d == 0 blocks are all 0
        return PackedWeight(_pack_pairs(codes), d, _pack_nibbles(zp), 4, _BLOCK, kb * _BLOCK, n)
    zp = np.divide(-m, d, out=np.zeros_like(d), where=d != 0)
    # A block with d == 0 is m everywhere: scale 1, zero point -m and code 0 give 0 * 1 + (-1 * -m) = m.
    flat = d == 0
    zp[flat] = -m[flat]
    scales = np.where(flat, np.float32(1), d)
    codes[flat] = 0
    return PackedWeight(_pack_pairs(codes), scales, zp, 4, _BLOCK, kb * _BLOCK, n)


def gguf_q4_1_split(data: np.ndarray) -> tuple[PackedWeight, np.ndarray]:
    """A Q4_1 weight exactly: codes with scale d and zero point 0, and the block minimums m (N, K / 32).

    W = dequantize(p) + m repeated over each block's 32 columns, so A @ W.T = MatMulNBits(A) +
    A.reshape(..., K / 32, 32).sum(-1) @ m.T.
    """
    b = _blocks(data, Q4_1)
    n, kb, _ = b.shape
    codes = _q4_codes(b[..., 4:])
    zero = np.zeros((n, -(-kb // 2)), np.uint8)
    p = PackedWeight(_pack_pairs(codes), _fp16(b[..., 0:2]), zero, 4, _BLOCK, kb * _BLOCK, n)
    return p, _fp16(b[..., 2:4])
