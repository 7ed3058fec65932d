"""Int4Linear: an nn.Linear whose weight is 4-bit, run by torch's CPU kernel `_weight_int4pack_mm_for_cpu`.

torch's int4 format (gpt-fast's) is per group of `group_size` along K: value = (code - 8) * scale + zero, with
scales_and_zeros (K / group_size, N, 2) in the activation dtype and codes packed by
`_convert_weight_to_int4pack_for_cpu` from int32 (N, K) (its innerKTiles argument is unused on CPU). A
MatMulNBits PackedWeight maps onto it with zero = (8 - zp) * scale: the same value in real arithmetic. The
kernel wants group_size in 32, 64, 128, 256, K % group_size == 0 and N % 16 == 0 (N is padded here), and is
fast in bfloat16 only: one token through a 576x1536 layer took 3-8 ms in float32 (a reference loop) against
30-65 us in bfloat16, about what float32 F.linear takes at that size, whose weights fit in cache (shared 2-core
EPYC). Hence dtype=bfloat16 by default, scales and zeros included; the gain is weights 8x smaller than float32.
Where this torch lacks the op, the dequantized weight is used.
"""

from collections.abc import Collection

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omni_kernels.errors import KernelError
from omni_kernels.quant import PackedWeight, dequantize, quantize_blockwise

__all__ = ["INT4_GROUP_SIZES", "Int4Linear", "has_int4_cpu_kernel", "quantize_linears_int4"]

INT4_GROUP_SIZES = (32, 64, 128, 256)
_N_MULTIPLE = 16
_DTYPES = (torch.bfloat16, torch.float32, torch.float16)


def has_int4_cpu_kernel() -> bool:
    """Whether this torch ships the CPU int4 weight-only matmul (torch >= 2.5)."""
    aten = torch.ops.aten
    return hasattr(aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        aten, "_convert_weight_to_int4pack_for_cpu"
    )


class Int4Linear(nn.Module):
    """y = x @ W.T + b with W held as 4-bit codes and per-group float scales and zeros."""

    def __init__(
        self, weight: PackedWeight, bias: Tensor | None = None, dtype: torch.dtype = torch.bfloat16
    ) -> None:
        super().__init__()
        if weight.bits != 4 or weight.block_size not in INT4_GROUP_SIZES or weight.K % weight.block_size:
            raise KernelError(
                f"Int4Linear needs 4 bits, a block size in {INT4_GROUP_SIZES} dividing K; got bits={weight.bits}, "
                f"block_size={weight.block_size}, K={weight.K}"
            )
        if dtype not in _DTYPES:
            raise KernelError(f"dtype must be one of {_DTYPES}, got {dtype}")
        if bias is not None and tuple(bias.shape) != (weight.N,):
            raise KernelError(f"bias must have shape ({weight.N},), got {tuple(bias.shape)}")
        self.in_features, self.out_features, self.group_size = weight.K, weight.N, weight.block_size
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.uses_int4_kernel = has_int4_cpu_kernel()
        if not self.uses_int4_kernel:
            self.register_buffer("weight", torch.from_numpy(dequantize(weight).copy()).to(dtype))
            return
        n_pad = -weight.N % _N_MULTIPLE
        codes = weight.codes().reshape(weight.N, weight.K).astype(np.int32)  # (N, K)
        scales = weight.scales  # (N, kb)
        zero = (8 - weight.zero_point_values().astype(np.float32)) * scales
        codes = np.pad(codes, ((0, n_pad), (0, 0)), constant_values=8)  # padded rows dequantize to 0
        sz = np.stack([np.pad(scales, ((0, n_pad), (0, 0))), np.pad(zero, ((0, n_pad), (0, 0)))], axis=-1)
        self.register_buffer(
            "weight_int4pack", torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.from_numpy(codes), 1)
        )
        sz = torch.from_numpy(sz.transpose(1, 0, 2).copy()).to(dtype)  # (kb, N, 2)
        self.register_buffer("scales_and_zeros", sz)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, group_size: int = 32, dtype: torch.dtype = torch.bfloat16
    ) -> "Int4Linear":
        """Quantize an nn.Linear asymmetrically per group of group_size inputs (MLAS's rule, as in quant)."""
        w = linear.weight.detach().float().cpu().numpy()
        return cls(quantize_blockwise(w, bits=4, block_size=group_size, symmetric=False), linear.bias, dtype)

    def forward(self, x: Tensor) -> Tensor:
        if not self.uses_int4_kernel:
            y = F.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)
        else:
            sz = self.scales_and_zeros
            x2 = x.reshape(-1, self.in_features).to(sz.dtype)  # (B*T, K)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight_int4pack, self.group_size, sz)
            y = y[:, : self.out_features].reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"
        )


def quantize_linears_int4(
    module: nn.Module,
    group_size: int = 32,
    skip: Collection[str] = ("lm_head",),
    dtype: torch.dtype = torch.bfloat16,
) -> nn.Module:
    """Replace, in place, every nn.Linear whose K divides by group_size with an Int4Linear; returns module.

    skip holds exact names: a layer is kept when its qualified name (`layers.0.mlp.up_proj`) or its own
    attribute name (`lm_head`) is in skip. Keeping lm_head by default also keeps a tied embedding intact.
    """
    if group_size not in INT4_GROUP_SIZES:
        raise KernelError(f"group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    for name, child in list(module.named_modules()):
        for attr, layer in list(child.named_children()):
            qualified = f"{name}.{attr}" if name else attr
            # Exactly nn.Linear: subclasses such as MultiheadAttention's out_proj are read as weights elsewhere.
            if type(layer) is not nn.Linear or attr in skip or qualified in skip:
                continue
            if layer.in_features % group_size:
                continue
            setattr(child, attr, Int4Linear.from_linear(layer, group_size, dtype))
    return module
