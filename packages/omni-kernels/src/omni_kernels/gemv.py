"""Native float32 matrix-vector product (y = x @ w.T for one row) for single-token decode.

Decoding one token of a 135M-parameter float32 model is bound by streaming the weights. On the 2-core
AMD EPYC (Zen 4, AVX-512) this was written on, `F.linear` (MKL sgemv) streams ~11 GB/s and oneDNN's
`torch.ops.mkldnn._linear_pointwise` 12-24 GB/s, while a plain loop with OpenMP over 2 threads that
streams one row after another reaches 27-38 GB/s. The kernel is csrc/gemv_f32.c, a ctypes library with AVX-512, AVX2+FMA and portable
paths picked at run time. It links libgomp.so.1, the soname torch ships in torch/lib, and is loaded only
after torch, so both share one OpenMP runtime (two on 2 cores would fight over them).
"""

import ctypes
import functools
import importlib.machinery
from enum import IntEnum
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from omni_kernels.errors import KernelError

__all__ = ["Isa", "KernelError", "available", "gemv_f32", "linear_f32", "supported_isas"]


class Isa(IntEnum):
    """Kernel path; matches the `isa` argument of omni_gemv_f32 in csrc/gemv_f32.c."""

    AUTO = 0
    PORTABLE = 1
    AVX2 = 2
    AVX512 = 3


@functools.cache
def _lib() -> ctypes.CDLL | None:
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_gemv_f32{suffix}"
        if path.is_file():
            break
    else:
        return None  # built without a C compiler: setup.py marks the extension optional
    lib = ctypes.CDLL(str(path))  # torch is already imported, so libgomp.so.1 resolves to torch's copy
    lib.omni_gemv_f32.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_int] * 2
    lib.omni_gemv_f32.restype = ctypes.c_int
    lib.omni_gemv_f32_supported.argtypes = [ctypes.c_int]
    lib.omni_gemv_f32_supported.restype = ctypes.c_int
    return lib


def available() -> bool:
    """Whether the native kernel was built and loads."""
    return _lib() is not None


def supported_isas() -> list[Isa]:
    """The concrete kernel paths this CPU can run (empty when the kernel is unavailable)."""
    lib = _lib()
    if lib is None:
        return []
    return [isa for isa in Isa if isa != Isa.AUTO and lib.omni_gemv_f32_supported(isa)]


def _check(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise KernelError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise KernelError(f"{name} must be on the CPU, got {t.device}")
    if t.dtype != torch.float32:
        raise KernelError(f"{name} must be float32, got {t.dtype}")
    if not t.is_contiguous():
        raise KernelError(f"{name} must be contiguous, got strides {t.stride()} for shape {tuple(t.shape)}")


def gemv_f32(
    x: Tensor, w: Tensor, out: Tensor | None = None, *, threads: int | None = None, isa: Isa = Isa.AUTO
) -> Tensor:
    """x @ w.T for x (..., n) holding one row and w (m, n), all contiguous float32 on the CPU; (..., m)."""
    lib = _lib()
    if lib is None:
        raise KernelError("the native gemv kernel was not built (no C compiler at install time)")
    _check("x", x)
    _check("w", w)
    if w.dim() != 2:
        raise KernelError(f"w must be 2-D (m, n), got shape {tuple(w.shape)}")
    m, n = w.shape
    if x.dim() == 0 or x.shape[-1] != n or x.numel() != n:
        raise KernelError(f"x must have shape (..., {n}) with one row in total, got {tuple(x.shape)}")
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        raise KernelError("gemv_f32 has no autograd; call it under torch.no_grad() or inference_mode()")
    shape = (*x.shape[:-1], m)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32)
    else:
        _check("out", out)
        if tuple(out.shape) != shape:
            raise KernelError(f"out must have shape {shape}, got {tuple(out.shape)}")
    if m == 0:
        return out
    if isa not in Isa.__members__.values():
        raise KernelError(f"isa must be one of {[int(i) for i in Isa]}, got {isa!r}")
    nthreads = torch.get_num_threads() if threads is None else threads
    if lib.omni_gemv_f32(w.data_ptr(), x.data_ptr(), out.data_ptr(), m, n, nthreads, int(isa)) < 0:
        raise KernelError(f"isa {Isa(isa).name} is not supported by this CPU")
    return out


def _native_applies(x: Tensor, w: Tensor, b: Tensor | None) -> bool:
    tensors = (x, w) if b is None else (x, w, b)
    return (
        available()
        and not torch.compiler.is_compiling()  # a ctypes call cannot be traced
        and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors)
        and w.dim() == 2
        and x.dim() >= 1
        and x.shape[-1] == w.shape[1]
        and x.numel() == w.shape[1]
        and (b is None or tuple(b.shape) == (w.shape[0],))
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
    )


def linear_f32(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """F.linear(x, w, b), by the native kernel for one float32 row, else oneDNN or F.linear."""
    if _native_applies(x, w, b):
        y = gemv_f32(x, w)
        return y if b is None else y.add_(b)
    if (
        torch.backends.mkldnn.is_available()
        and not torch.compiler.is_compiling()
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and w.dtype == x.dtype
        and w.device.type == "cpu"
        and (b is None or (b.dtype == x.dtype and b.device.type == "cpu"))
        and x.dim() >= 1
        and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w, b)))
    ):
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    return F.linear(x, w, b)
