"""GGUF Q4_0 / Q4_1 / Q8_0 blocks to MatMulNBits without requantizing, held to gguf's own dequantizer and ORT."""

import numpy as np
import pytest

from omni_kernels import KernelError, dequantize, gguf_q4_1_split, gguf_to_packed

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType
N, K = 24, 160


def _weights(seed: int = 0) -> np.ndarray:
    w = np.random.default_rng(seed).standard_normal((N, K)).astype(np.float32) * 0.05
    w[1, :32] = 0.7  # a constant block: Q4_1 stores d = 0 and m = 0.7
    w[2, 32:64] = 0  # an all-zero block
    return w


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q8_0], ids=lambda t: t.name)
def test_symmetric_types_are_bit_exact(matmulnbits, qtype) -> None:
    raw = gguf.quants.quantize(_weights(), qtype)
    ref = gguf.quants.dequantize(raw, qtype)
    p = gguf_to_packed(raw, qtype)
    assert (p.bits, p.block_size, p.K, p.N, p.symmetric) == (4 if qtype == T.Q4_0 else 8, 32, K, N, True)
    np.testing.assert_array_equal(dequantize(p), ref)
    np.testing.assert_array_equal(matmulnbits(p, np.eye(K, dtype=np.float32)).T, ref)  # ORT's own weights


def test_q4_0_nibble_order() -> None:
    # GGUF byte j: element j low, element j + 16 high. Element j gets code j % 16, element j + 16 code 15 - j.
    qs = np.array([(j % 16) | ((15 - j) << 4) for j in range(16)], np.uint8)
    block = np.concatenate([np.array([1.0], np.float16).view(np.uint8), qs])[None]  # (1, 18)
    p = gguf_to_packed(block, T.Q4_0)
    assert p.codes()[0, 0].tolist() == [j % 16 for j in range(16)] + [15 - j for j in range(16)]
    assert p.packed[0, 0, 0] == 0 | (1 << 4)  # elements 0 and 1 share byte 0
    np.testing.assert_array_equal(dequantize(p), gguf.quants.dequantize(block, T.Q4_0))


def test_q4_1_float_zero_points(matmulnbits) -> None:
    raw = gguf.quants.quantize(_weights(1), T.Q4_1)
    ref = gguf.quants.dequantize(raw, T.Q4_1)
    p = gguf_to_packed(raw, T.Q4_1)
    assert p.zero_points is not None and p.zero_points.dtype == np.float32
    deq = dequantize(p)
    np.testing.assert_array_equal(matmulnbits(p, np.eye(K, dtype=np.float32)).T, deq)  # ORT takes them as is
    # code * d + (-d * zp) equals GGUF's code * d + m wherever -d * zp rounds back to m, and is one float32
    # ulp of m away elsewhere.
    blocks = raw.reshape(N, -1, 20)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    exact = np.repeat((-p.scales * p.zero_points) == m, 32, axis=1)
    np.testing.assert_array_equal(deq[exact], ref[exact])
    mb = np.repeat(np.abs(m), 32, axis=1)
    assert (np.abs(deq - ref) <= np.spacing(mb) + np.spacing(np.abs(ref))).all()
    assert exact.mean() > 0.8
    assert d[1, 0] == 0  # the constant block: stored as scale 1, zero point -m, codes 0
    np.testing.assert_array_equal(deq[1, :32], ref[1, :32])


def test_q4_1_integer_zero_points_are_bit_exact(matmulnbits) -> None:
    rng = np.random.default_rng(2)
    d = (2.0 ** -rng.integers(3, 9, (N, K // 32))).astype(np.float16)  # m = -z * d is exact in fp16
    m = (-rng.integers(0, 16, d.shape) * d.astype(np.float32)).astype(np.float16)
    qs = rng.integers(0, 256, (N, K // 32, 16), dtype=np.uint8)
    blocks = np.concatenate([d[..., None].view(np.uint8), m[..., None].view(np.uint8), qs], axis=-1)
    raw = blocks.reshape(N, -1)  # (N, K / 32 * 20)
    ref = gguf.quants.dequantize(raw, T.Q4_1)
    p = gguf_to_packed(raw, T.Q4_1)
    assert p.zero_points.dtype == np.uint8
    np.testing.assert_array_equal(dequantize(p), ref)
    np.testing.assert_array_equal(matmulnbits(p, np.eye(K, dtype=np.float32)).T, ref)


def test_q4_1_split_is_exact(matmulnbits) -> None:
    raw = gguf.quants.quantize(_weights(3), T.Q4_1)
    ref = gguf.quants.dequantize(raw, T.Q4_1)
    p, offsets = gguf_q4_1_split(raw)
    assert offsets.shape == (N, K // 32) and p.zero_points.dtype == np.uint8
    np.testing.assert_array_equal(dequantize(p) + np.repeat(offsets, 32, axis=1), ref)
    np.testing.assert_array_equal(matmulnbits(p, np.eye(K, dtype=np.float32), offsets).T, ref)
    a = np.random.default_rng(0).standard_normal((2, K)).astype(np.float32)
    np.testing.assert_allclose(matmulnbits(p, a, offsets), a @ ref.T, rtol=1e-5, atol=1e-5)


def test_reads_gguf_reader_tensors(tmp_path) -> None:
    path = tmp_path / "w.gguf"
    w = _weights(4)
    writer = gguf.GGUFWriter(path, "llama")
    direct = {}
    for qtype in (T.Q4_0, T.Q4_1, T.Q8_0):
        raw = gguf.quants.quantize(w, qtype)
        writer.add_tensor(f"w.{qtype.name}", raw, raw_dtype=qtype)
        direct[qtype] = gguf_to_packed(raw, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tensors = gguf.GGUFReader(path).tensors
    assert len(tensors) == 3
    for t in tensors:
        p, q = gguf_to_packed(t.data, t.tensor_type), direct[t.tensor_type]
        assert (p.N, p.K) == (N, K)  # the reader's rows are the weight's N output rows
        np.testing.assert_array_equal(dequantize(p), dequantize(q))


def test_rejects_other_types_and_shapes() -> None:
    raw = gguf.quants.quantize(_weights(), T.Q8_0)
    with pytest.raises(KernelError, match="qtype"):
        gguf_to_packed(raw, T.Q4_K)
    with pytest.raises(KernelError, match="multiple of 34"):
        gguf_to_packed(raw[:, :-1], T.Q8_0)
    with pytest.raises(KernelError, match="uint8"):
        gguf_to_packed(raw.reshape(-1), T.Q8_0)
