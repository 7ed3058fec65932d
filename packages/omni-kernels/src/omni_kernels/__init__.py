"""OmniCoder kernels: native CPU kernels loaded with ctypes, with torch fallbacks when not built.

gemv_f32 is the float32 matrix-vector product of single-token decode (see omni_kernels.gemv for why a
hand-written kernel beats MKL and oneDNN here); linear_f32 picks it when it applies.
"""

from omni_kernels.gemv import Isa, KernelError, available, gemv_f32, linear_f32, supported_isas

__all__ = ["Isa", "KernelError", "available", "gemv_f32", "linear_f32", "supported_isas"]
