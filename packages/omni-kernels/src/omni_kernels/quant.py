"""Block-wise 4-bit and 8-bit weight packing, byte for byte what ONNX Runtime's MatMulNBits reads.

A weight W (N, K) (nn.Linear's (out, in); MatMulNBits computes Y = A @ W.T) is cut along K into
k_blocks = ceil(K / block_size) blocks. The last block's padding holds the zero point's code (it dequantizes
to 0; MatMulNBits never reads it). The PackedWeight arrays are MatMulNBits' inputs B, scales, zero_points:
- packed uint8 (N, k_blocks, block_size * bits // 8). 4 bits: element 2i of a block in the low nibble of
  byte i, element 2i+1 in the high nibble (GGUF's Q4_0 order differs, see gguf_convert). 8 bits: one a byte.
- scales float32 (N, k_blocks).
- zero_points None (symmetric: MatMulNBits assumes 8 for 4 bits, 128 for 8 bits); uint8 (N, ceil(k_blocks / 2))
  for 4 bits, block 2j in the low nibble of byte j and 8 in an odd count's last high nibble; uint8
  (N, k_blocks) for 8 bits; or float32 (N, k_blocks), 4 bits only (GGUF Q4_1, see gguf_convert).
- value = (code - zp) * scale; with a float zero point code * scale + (-scale * zp), as ORT computes it.
quantize_blockwise is MLAS's MlasQuantizeBlockwise (onnxruntime/core/mlas/lib/q4_dq.cpp, what
onnxruntime.quantization's MatMulNBitsQuantizer calls), all in float32: symmetric scale = -v / 2^(bits-1) with
v the block's value of largest magnitude (the negative one on a tie), so v gets code 0 and scales may be
negative; asymmetric scale = (max(max, 0) - min(min, 0)) / (2^bits - 1) and zp = roundf(-min / scale),
clamped; code = clamp(roundf(w * (1 / scale) + zp)). roundf rounds halves away from zero.
"""

from dataclasses import dataclass

import numpy as np

from omni_kernels.errors import KernelError

__all__ = ["BITS", "BLOCK_SIZES", "PackedWeight", "dequantize", "quantize_blockwise"]

BITS = (4, 8)
BLOCK_SIZES = (16, 32, 64, 128, 256)  # MatMulNBits takes powers of two >= 16; MLAS's kernels stop at 256
_CHUNK_ELEMENTS = 1 << 22  # rows per quantize step: float32 temporaries stay ~16 MB for any matrix width
_F32 = np.float32


@dataclass(frozen=True, eq=False)
class PackedWeight:
    """A weight (N, K) in MatMulNBits layout; the field names K and N are the node's attributes."""

    packed: np.ndarray  # uint8 (N, k_blocks, block_size * bits // 8)
    scales: np.ndarray  # float32 (N, k_blocks)
    zero_points: np.ndarray | None  # see the module docstring for the three layouts
    bits: int
    block_size: int
    K: int
    N: int

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise KernelError(f"bits must be one of {BITS}, got {self.bits}")
        if self.block_size not in BLOCK_SIZES:
            raise KernelError(f"block_size must be one of {BLOCK_SIZES}, got {self.block_size}")
        if self.K < 1 or self.N < 1:
            raise KernelError(f"K and N must be positive, got K={self.K}, N={self.N}")
        kb = self.k_blocks
        _check_array("packed", self.packed, np.uint8, (self.N, kb, self.block_size * self.bits // 8))
        _check_array("scales", self.scales, np.float32, (self.N, kb))
        zp = self.zero_points
        if zp is None:
            return
        if zp.dtype == np.float32 and self.bits != 4:
            raise KernelError("float zero_points are 4-bit only (ORT's CPU MatMulNBits takes no others)")
        if zp.dtype == np.float32:
            _check_array("zero_points", zp, np.float32, (self.N, kb))
        else:
            _check_array("zero_points", zp, np.uint8, (self.N, -(-kb * self.bits // 8)))

    @property
    def k_blocks(self) -> int:
        """Blocks along K, the last one padded."""
        return -(-self.K // self.block_size)

    @property
    def symmetric(self) -> bool:
        """No zero_points input: MatMulNBits uses 2^(bits-1)."""
        return self.zero_points is None

    @property
    def attributes(self) -> dict[str, int]:
        """The MatMulNBits attributes this weight needs (accuracy_level is the caller's choice)."""
        return {"K": self.K, "N": self.N, "bits": self.bits, "block_size": self.block_size}

    def codes(self) -> np.ndarray:
        """The unpacked codes, uint8 (N, k_blocks, block_size), padding included."""
        if self.bits == 8:
            return self.packed
        codes = np.empty((self.N, self.k_blocks, self.block_size), np.uint8)
        codes[..., 0::2] = self.packed & 0x0F
        codes[..., 1::2] = self.packed >> 4
        return codes

    def zero_point_values(self) -> np.ndarray:
        """One zero point per block (N, k_blocks): uint8, the default filled in, or float32."""
        zp = self.zero_points
        if zp is None:
            return np.full((self.N, self.k_blocks), 1 << (self.bits - 1), np.uint8)
        if zp.dtype == np.float32 or self.bits == 8:
            return zp
        return np.stack([zp & 0x0F, zp >> 4], axis=-1).reshape(self.N, -1)[:, : self.k_blocks]


def _check_array(name: str, a: object, dtype: type, shape: tuple[int, ...]) -> None:
    if not isinstance(a, np.ndarray) or a.dtype != dtype:
        got = a.dtype if isinstance(a, np.ndarray) else type(a).__name__
        raise KernelError(f"{name} must be a numpy {np.dtype(dtype)} array, got {got}")
    if a.shape != shape:
        raise KernelError(f"{name} must have shape {shape}, got {a.shape}")


def _roundf(x: np.ndarray) -> np.ndarray:
    # C's roundf (halves away from zero); np.round rounds halves to even, and floor(x + 0.5) is off for
    # 0.49999997. x - trunc(x) is exact in float32.
    t = np.trunc(x)
    return t + np.where(np.abs(x - t) >= _F32(0.5), np.sign(x), _F32(0))


def _quantize_rows(
    w: np.ndarray, bits: int, block_size: int, symmetric: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n, k = w.shape
    kb = -(-k // block_size)
    pad = kb * block_size - k
    # Zero padding changes no block's scale: the asymmetric range includes 0 anyway, and a 0 never has the
    # strictly largest magnitude the symmetric rule looks for.
    wb = np.pad(w, ((0, 0), (0, pad))).reshape(n, kb, block_size)  # (n, kb, bs)
    lo, hi = wb.min(axis=-1), wb.max(axis=-1)  # (n, kb)
    qmax = _F32((1 << bits) - 1)
    if symmetric:
        v = np.where(np.abs(hi) > np.abs(lo), hi, lo)
        scales = -v / _F32(1 << (bits - 1))
        zp = np.full((n, kb), 1 << (bits - 1), np.uint8)
    else:
        lo, hi = np.minimum(lo, _F32(0)), np.maximum(hi, _F32(0))
        scales = (hi - lo) / qmax
        zp_f = np.divide(-lo, scales, out=lo.copy(), where=scales != 0)  # an all-zero block keeps lo = 0
        zp = np.clip(_roundf(zp_f), 0, qmax).astype(np.uint8)
    inv = np.divide(_F32(1), scales, out=np.zeros_like(scales), where=scales != 0)
    x = wb * inv[..., None] + zp.astype(_F32)[..., None]  # two float32 roundings, as MLAS (no FMA there)
    codes = np.clip(_roundf(x), 0, qmax).astype(np.uint8)
    if pad:
        codes[:, -1, block_size - pad :] = zp[:, -1:]
    return codes, scales, zp


def quantize_blockwise(
    w: np.ndarray, bits: int = 4, block_size: int = 32, symmetric: bool = True
) -> PackedWeight:
    """Quantize w (N, K) block-wise along K into MatMulNBits' layout, as ORT's own quantizer would."""
    if bits not in BITS:
        raise KernelError(f"bits must be one of {BITS}, got {bits}")
    if block_size not in BLOCK_SIZES:
        raise KernelError(f"block_size must be one of {BLOCK_SIZES}, got {block_size}")
    if not isinstance(w, np.ndarray) or w.ndim != 2 or w.size == 0 or not np.issubdtype(w.dtype, np.floating):
        desc = f"{w.dtype} {w.shape}" if isinstance(w, np.ndarray) else type(w).__name__
        raise KernelError(f"w must be a non-empty 2-D floating numpy array (N, K), got {desc}")
    w = w.astype(np.float32, copy=False)
    if not np.isfinite(w).all():
        raise KernelError("w holds NaN or inf; MatMulNBits blocks have no code for them")
    n, k = w.shape
    kb = -(-k // block_size)
    codes = np.empty((n, kb, block_size), np.uint8)
    scales = np.empty((n, kb), np.float32)
    zps = np.empty((n, kb), np.uint8)
    step = max(1, _CHUNK_ELEMENTS // (kb * block_size))
    for r in range(0, n, step):
        codes[r : r + step], scales[r : r + step], zps[r : r + step] = _quantize_rows(
            w[r : r + step], bits, block_size, symmetric
        )
    packed = codes if bits == 8 else codes[..., 0::2] | (codes[..., 1::2] << 4)
    zero_points = None
    if not symmetric:
        zero_points = zps if bits == 8 else _pack_nibbles(zps)
    return PackedWeight(np.ascontiguousarray(packed), scales, zero_points, bits, block_size, k, n)


def _pack_nibbles(v: np.ndarray) -> np.ndarray:
    if v.shape[-1] % 2:
        v = np.pad(v, ((0, 0), (0, 1)), constant_values=8)  # MLAS writes its default, 8, in the unused nibble
    return v[:, 0::2] | (v[:, 1::2] << 4)


def dequantize(p: PackedWeight) -> np.ndarray:
    """The float32 weight (N, K) that MatMulNBits multiplies by, computed as ORT's CPU kernel does."""
    codes = p.codes()
    scales = p.scales[..., None]  # (N, kb, 1)
    zp = p.zero_point_values()[..., None]
    if zp.dtype == np.float32:
        w = codes.astype(np.float32) * scales + (-scales * zp)
    else:
        w = (codes.astype(np.int16) - zp.astype(np.int16)).astype(np.float32) * scales
    return w.reshape(p.N, -1)[:, : p.K]
