"""OmniCoder kernels: native CPU kernels loaded with ctypes, low-bit weight packing and a torch int4 linear.

gemv_f32 is the float32 matrix-vector product of single-token decode (see omni_kernels.gemv for why a
hand-written kernel beats MKL and oneDNN here); linear_f32 picks it when it applies. quant packs weights in
ONNX Runtime's MatMulNBits layout, gguf_convert maps GGUF Q4_0 / Q4_1 / Q8_0 onto it, and int4_linear runs
4-bit weights in torch. quant and gguf_convert need only numpy: the torch modules load on first use.
"""

import importlib

from omni_kernels.errors import KernelError
from omni_kernels.gguf_convert import GGUF_TYPES, gguf_q4_1_split, gguf_to_packed
from omni_kernels.quant import BITS, BLOCK_SIZES, PackedWeight, dequantize, quantize_blockwise

_LAZY = {
    "Isa": "gemv",
    "available": "gemv",
    "gemv_f32": "gemv",
    "linear_f32": "gemv",
    "supported_isas": "gemv",
    "INT4_GROUP_SIZES": "int4_linear",
    "Int4Linear": "int4_linear",
    "has_int4_cpu_kernel": "int4_linear",
    "quantize_linears_int4": "int4_linear",
}

__all__ = [
    "BITS",
    "BLOCK_SIZES",
    "GGUF_TYPES",
    "KernelError",
    "PackedWeight",
    "dequantize",
    "gguf_q4_1_split",
    "gguf_to_packed",
    "quantize_blockwise",
    *_LAZY,
]


def __getattr__(name: str) -> object:
    # Importing torch takes seconds; an ONNX Runtime deployment imports only the numpy modules above.
    if name in _LAZY:
        return getattr(importlib.import_module(f"omni_kernels.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'omni_kernels' has no attribute {name!r}")
