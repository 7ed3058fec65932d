"""quantize_blockwise against ONNX Runtime's own quantizer (byte for byte) and its MatMulNBits kernel."""

import subprocess
import sys

import numpy as np
import pytest

from omni_kernels import BLOCK_SIZES, KernelError, PackedWeight, dequantize, quantize_blockwise

N = 16


def _weights(k: int, seed: int) -> np.ndarray:
    """Random rows of very different scales, plus the rows where rounding and tie rules show."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((N, k)).astype(np.float32) * rng.uniform(1e-3, 4, (N, 1)).astype(np.float32)
    w[0] = 0  # scale 0
    w[1] = np.abs(w[1])  # all positive: symmetric picks the max, asymmetric zero point 0
    w[2] = -np.abs(w[2])  # all negative
    w[3] = rng.integers(-16, 17, k) / 4  # quarters: many codes land exactly on .5 before rounding
    w[4, ::2], w[4, 1::2] = 1.5, -1.5  # a magnitude tie: symmetric takes the negative one
    w[5] = 0.25  # constant block
    return w


def _ort_quantize(w: np.ndarray, bits: int, block_size: int, symmetric: bool):
    # As onnxruntime.quantization.matmul_nbits_quantizer.DefaultWeightOnlyQuantizer.qbits_block_quant: the
    # weight goes in transposed, (K, N) C-contiguous, padded along K to whole blocks; N and the real K after.
    pybind = pytest.importorskip("onnxruntime.capi._pybind_state")
    n, k = w.shape
    kb = -(-k // block_size)
    wt = np.pad(np.ascontiguousarray(w.T), ((0, kb * block_size - k), (0, 0)))
    packed = np.zeros((n, kb, block_size * bits // 8), np.uint8)
    zero_points = np.zeros((n, -(-kb * bits // 8)), np.uint8)
    scales = np.zeros((n, kb), np.float32)
    quantize = pybind.quantize_matmul_4bits if bits == 4 else pybind.quantize_matmul_8bits
    quantize(packed, wt, scales, zero_points, block_size, n, k, symmetric)
    return packed, scales, zero_points


@pytest.mark.parametrize("ragged", [False, True], ids=["whole", "ragged"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("bits", [4, 8])
def test_matches_ort_quantizer(bits: int, block_size: int, symmetric: bool, ragged: bool) -> None:
    k = 3 * block_size + (block_size // 2 + 1 if ragged else 0)  # odd block count: zero point padding nibble
    w = _weights(k, seed=bits * 1000 + block_size)
    p = quantize_blockwise(w, bits, block_size, symmetric)
    packed, scales, zero_points = _ort_quantize(w, bits, block_size, symmetric)
    assert p.scales.view(np.uint32).tolist() == scales.view(np.uint32).tolist()  # bit for bit, -0.0 included
    if symmetric:
        assert p.zero_points is None
    else:
        np.testing.assert_array_equal(p.zero_points, zero_points)
    if not ragged:
        np.testing.assert_array_equal(p.packed, packed)
        return
    # Past K, MLAS leaves bytes unwritten (0, or a stale nibble for odd K); ours hold the zero point's code.
    theirs = PackedWeight(packed, scales, p.zero_points, bits, block_size, k, N).codes().reshape(N, -1)
    ours = p.codes().reshape(N, -1)
    np.testing.assert_array_equal(ours[:, :k], theirs[:, :k])
    np.testing.assert_array_equal(
        ours[:, k:], np.broadcast_to(p.zero_point_values()[:, -1:], ours[:, k:].shape)
    )


@pytest.mark.parametrize("ragged", [False, True], ids=["whole", "ragged"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", [4, 8])
def test_matmulnbits_computes_dequantized(matmulnbits, bits: int, symmetric: bool, ragged: bool) -> None:
    k = 128 + (45 if ragged else 0)
    w = _weights(k, seed=bits + 7 * ragged)
    p = quantize_blockwise(w, bits, 32, symmetric)
    deq = dequantize(p)
    assert deq.shape == (N, k) and deq.dtype == np.float32
    # A = I makes every product exact: ORT hands back the very weights it multiplies by.
    np.testing.assert_array_equal(matmulnbits(p, np.eye(k, dtype=np.float32)).T, deq)
    a = np.random.default_rng(0).standard_normal((3, k)).astype(np.float32)
    ref = a.astype(np.float64) @ deq.T.astype(np.float64)
    err = np.abs(matmulnbits(p, a) - ref)
    assert (err <= 1e-5 * (np.abs(a) @ np.abs(deq).T) + 1e-6).all(), err.max()


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", [4, 8])
def test_dequantize_error_within_one_step(bits: int, symmetric: bool) -> None:
    w = _weights(200, seed=3)
    p = quantize_blockwise(w, bits, 64, symmetric)
    step = np.repeat(np.abs(p.scales), 64, axis=1)[:, :200]
    # Half a step of rounding, up to a step at the ends: symmetric clips the side opposite its largest value,
    # asymmetric shifts the range by its rounded zero point.
    err = np.abs(dequantize(p) - w)
    assert (err <= step * (1 + 1e-5) + 1e-12).all()
    assert np.median(err / np.maximum(step, 1e-30)) < 0.3
    assert p.codes().max() < 1 << bits


def test_nibble_and_zero_point_layout() -> None:
    w = np.array([[1.0, 2.0, 3.0, 4.0] * 4 + [-1.0] * 16], np.float32)  # two blocks of 16
    p = quantize_blockwise(w, 4, 16, symmetric=False)
    codes = p.codes()[0]
    assert p.packed[0, 0, 0] == codes[0, 0] | (codes[0, 1] << 4)  # element 0 low nibble, element 1 high
    assert p.zero_points.shape == (1, 1)
    assert p.zero_points[0, 0] == p.zero_point_values()[0, 0] | (p.zero_point_values()[0, 1] << 4)
    assert p.zero_point_values()[0].tolist() == [0, 15]  # all positive, all negative


def test_rejects_what_it_cannot_pack() -> None:
    w = np.ones((4, 32), np.float32)
    for bad in (dict(bits=3), dict(block_size=24)):
        with pytest.raises(KernelError, match=next(iter(bad))):
            quantize_blockwise(w, **bad)
    for x in (np.ones(32, np.float32), np.ones((4, 32), np.int32), np.full((4, 32), np.nan, np.float32)):
        with pytest.raises(KernelError):
            quantize_blockwise(x)
    p = quantize_blockwise(w, 4, 32, symmetric=False)
    with pytest.raises(KernelError, match="scales"):
        PackedWeight(p.packed, p.scales[:, :0], None, 4, 32, 32, 4)
    with pytest.raises(KernelError, match="zero_points"):
        PackedWeight(p.packed, p.scales, np.zeros((4, 2), np.uint8), 4, 32, 32, 4)
    with pytest.raises(KernelError, match="4-bit only"):
        PackedWeight(np.zeros((4, 1, 32), np.uint8), p.scales, np.zeros((4, 1), np.float32), 8, 32, 32, 4)


def test_imports_without_torch() -> None:
    code = (
        "import sys; import omni_kernels; from omni_kernels import quantize_blockwise, gguf_to_packed; "
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
