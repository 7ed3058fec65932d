"""Parity of the native gemv kernel with x @ w.T on every path this CPU runs, and its input checks."""

import ast
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from omni_kernels import Isa, KernelError, available, gemv_f32, linear_f32, supported_isas
from omni_kernels import gemv as gemv_mod

needs_native = pytest.mark.skipif(not available(), reason="native kernel not built")

NS = [1, 7, 15, 16, 17, 31, 576, 1000, 1536]
MS = [1, 3, 8, 9, 17, 960]
ISAS = [pytest.param(isa, id=isa.name) for isa in (Isa.PORTABLE, Isa.AVX2, Isa.AVX512)]


def _need(isa: Isa) -> None:
    if isa not in supported_isas():
        pytest.skip(f"{isa.name} not supported by this CPU")


def _assert_close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    ref = (x.double().reshape(1, -1) @ w.double().T).reshape(y.shape)
    # float32 sums in a different order: tolerance scales with the sum of |terms|, not the result.
    scale = (x.double().abs().reshape(1, -1) @ w.double().abs().T).reshape(y.shape)
    err = (y.double() - ref).abs()
    assert (err <= 1e-5 * scale + 1e-6).all(), f"max err {err.max().item()} (scale {scale.max().item()})"


@needs_native
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("m", MS)
def test_matches_matmul(m: int, n: int, threads: int, isa: Isa) -> None:
    _need(isa)
    g = torch.Generator().manual_seed(m * 10007 + n)
    x, w = torch.randn(n, generator=g), torch.randn(m, n, generator=g)
    y = gemv_f32(x, w, threads=threads, isa=isa)
    assert y.shape == (m,)
    _assert_close(y, x, w)


@needs_native
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n", [576, 1000])
def test_tall_matrix(n: int, isa: Isa) -> None:
    _need(isa)
    m = 49152  # the SmolLM2 vocabulary head: many row blocks split over threads
    g = torch.Generator().manual_seed(n)
    x, w = torch.randn(1, 1, n, generator=g), torch.randn(m, n, generator=g)
    y = gemv_f32(x, w, threads=2, isa=isa)
    assert y.shape == (1, 1, m)
    _assert_close(y, x, w)


@needs_native
def test_paths_agree_with_auto() -> None:
    x, w = torch.randn(1536), torch.randn(577, 1536)
    auto = gemv_f32(x, w)
    for isa in supported_isas():
        torch.testing.assert_close(gemv_f32(x, w, isa=isa), auto, rtol=1e-4, atol=1e-3)


@needs_native
def test_leading_dims_and_out() -> None:
    x, w = torch.randn(1, 1, 17), torch.randn(9, 17)
    out = torch.full((1, 1, 9), float("nan"))
    y = gemv_f32(x, w, out=out)
    assert y is out
    _assert_close(y, x, w)


@needs_native
def test_column_tail_reads_no_neighbour() -> None:
    # Rows of 17 floats are followed by NaNs in memory: a tail load past the row would poison the sum.
    m, n = 9, 17
    buf = torch.full((m * n + 64,), float("nan"))
    w = buf[: m * n].view(m, n)
    w.copy_(torch.randn(m, n))
    xbuf = torch.full((n + 64,), float("nan"))
    x = xbuf[:n]
    x.copy_(torch.randn(n))
    for isa in supported_isas():
        y = gemv_f32(x, w, isa=isa)
        assert torch.isfinite(y).all(), isa.name
        _assert_close(y, x, w)


@needs_native
def test_empty() -> None:
    assert gemv_f32(torch.randn(5), torch.randn(0, 5)).shape == (0,)
    assert torch.equal(gemv_f32(torch.randn(0), torch.randn(3, 0)), torch.zeros(3))


@needs_native
@pytest.mark.parametrize(
    ("x", "w", "match"),
    [
        (torch.randn(2, 8), torch.randn(4, 8), "one row"),
        (torch.randn(7), torch.randn(4, 8), "one row"),
        (torch.randn(8, dtype=torch.float64), torch.randn(4, 8), "x must be float32"),
        (torch.randn(8), torch.randn(4, 8, dtype=torch.bfloat16), "w must be float32"),
        (torch.randn(8), torch.randn(8, 4).T, "w must be contiguous"),
        (torch.randn(8, 2)[:, 0], torch.randn(4, 8), "x must be contiguous"),
        (torch.randn(8), torch.randn(2, 4, 8), "2-D"),
        (torch.randn(8), torch.randn(4, 8, device="meta"), "CPU"),
        ([0.0] * 8, torch.randn(4, 8), "torch.Tensor"),
    ],
)
def test_bad_input(x, w, match: str) -> None:
    with pytest.raises(KernelError, match=match):
        gemv_f32(x, w)


@needs_native
def test_bad_out_and_grad() -> None:
    x, w = torch.randn(8), torch.randn(4, 8)
    with pytest.raises(KernelError, match="out must have shape"):
        gemv_f32(x, w, out=torch.empty(5))
    with pytest.raises(KernelError, match="autograd"):
        gemv_f32(x, w.requires_grad_())
    with torch.no_grad():
        _assert_close(gemv_f32(x, w), x, w)
    assert issubclass(KernelError, ValueError)


@needs_native
def test_unknown_or_unsupported_isa() -> None:
    x, w = torch.randn(8), torch.randn(4, 8)
    with pytest.raises(KernelError, match="isa must be one of"):
        gemv_f32(x, w, isa=99)
    assert gemv_mod._lib().omni_gemv_f32(w.data_ptr(), x.data_ptr(), 0, 4, 8, 1, 99) == -1  # C checks too
    for isa in set(Isa) - set(supported_isas()) - {Isa.AUTO}:
        with pytest.raises(KernelError, match="not supported"):
            gemv_f32(x, w, isa=isa)


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = gemv_mod.gemv_f32
    monkeypatch.setattr(gemv_mod, "gemv_f32", lambda *a, **k: calls.append("native") or real(*a, **k))
    return calls


@needs_native
@pytest.mark.parametrize("bias", [False, True])
def test_linear_uses_native_for_one_row(monkeypatch: pytest.MonkeyPatch, bias: bool) -> None:
    calls = _spy(monkeypatch)
    x, w = torch.randn(1, 1, 577), torch.randn(33, 577)
    b = torch.randn(33) if bias else None
    y = linear_f32(x, w, b)
    assert calls == ["native"]
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("x", "w"),
    [
        (torch.randn(1, 3, 64), torch.randn(16, 64)),  # several rows: prefill
        (torch.randn(1, 64, dtype=torch.bfloat16), torch.randn(16, 64, dtype=torch.bfloat16)),
        (torch.randn(1, 64, dtype=torch.float64), torch.randn(16, 64, dtype=torch.float64)),
        (torch.randn(1, 64), torch.randn(64, 16).T),  # non-contiguous weight
    ],
)
def test_linear_falls_back(monkeypatch: pytest.MonkeyPatch, x: torch.Tensor, w: torch.Tensor) -> None:
    calls = _spy(monkeypatch)
    y = linear_f32(x, w)
    assert calls == []
    tol = 2e-2 if x.dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(y, F.linear(x, w), rtol=tol, atol=tol)


def test_linear_keeps_autograd() -> None:
    x, w = torch.randn(1, 32), torch.randn(8, 32, requires_grad=True)
    linear_f32(x, w).sum().backward()
    torch.testing.assert_close(w.grad, x.expand(8, 32))


@needs_native
@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/maps")
def test_one_openmp_runtime() -> None:
    # The kernel must share torch's libgomp: a second OpenMP runtime would oversubscribe the cores.
    # A fresh interpreter, because other test modules load libraries with their own copies.
    probe = (
        "import torch; from pathlib import Path; from omni_kernels import gemv_f32\n"
        "gemv_f32(torch.randn(576), torch.randn(960, 576), threads=2)\n"
        "maps = Path('/proc/self/maps').read_text().splitlines()\n"
        "print(sorted({l.split()[-1] for l in maps if 'libgomp' in l or 'libiomp' in l}))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    runtimes = ast.literal_eval(out.strip().splitlines()[-1])
    assert len(runtimes) == 1 and "torch" in runtimes[0], runtimes


def test_without_native_library(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gemv_mod, "_lib", lambda: None)  # as after an install without a C compiler
    assert not gemv_mod.available() and gemv_mod.supported_isas() == []
    x, w = torch.randn(1, 64), torch.randn(16, 64)
    torch.testing.assert_close(gemv_mod.linear_f32(x, w), F.linear(x, w), rtol=1e-4, atol=1e-4)
    with pytest.raises(KernelError, match="not built"):
        gemv_mod.gemv_f32(x, w)
