"""The weights an export writes: float arrays, or block-quantized linears in MatMulNBits' layout.

Quantized exports keep what a GGUF file already quantized: its Q4_0, Q4_1 and Q8_0 tensors are
converted block for block (omni_kernels.gguf_convert), never dequantized and quantized again, which
would add a second rounding error on top of the first. Q4_1 (value = code * d + m) becomes codes
with scale d and zero point 0 plus the block minimums m, which the graph adds back as
blocksum(x) @ m.T: exact, and MatMulNBits stays on its packed kernels. Other tensors are quantized
from float (omni_kernels.quant, ORT's own rounding). The embedding and the output head keep 8 bits
in 4-bit exports, as llama.cpp's 4-bit files keep them (Q8_0 / Q6_K).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from omni_export.errors import UnsupportedExportError
from omni_kernels.gguf_convert import GGUF_TYPES, gguf_q4_1_split, gguf_to_packed
from omni_kernels.quant import PackedWeight, quantize_blockwise
from omni_model.checkpoint.gguf import gguf_target, unpermute_rows
from omni_model.checkpoint.gguf_file import is_gguf, read_gguf
from omni_model.config import ModelConfig

Q4_1 = 3


@dataclass(frozen=True, eq=False)
class QuantLinear:
    """A linear's (N, K) weight as MatMulNBits inputs; `mins` (N, K / block) float32 when it came from
    GGUF Q4_1: the weight is dequantize(packed) plus each block's minimum."""

    packed: PackedWeight
    mins: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        p = self.packed
        zp = 0 if p.zero_points is None else p.zero_points.nbytes
        return p.packed.nbytes + p.scales.nbytes + zp + (0 if self.mins is None else self.mins.nbytes)


Weight = np.ndarray | QuantLinear


def concat_rows(ws: list[Weight]) -> Weight:
    """One weight whose output rows are those of `ws` in order (fused projections)."""
    if all(isinstance(w, np.ndarray) for w in ws):
        return np.concatenate(ws, axis=0)
    qs = [w for w in ws if isinstance(w, QuantLinear)]
    ps = [q.packed for q in qs]
    first = ps[0]
    same = all((p.bits, p.block_size, p.K, p.zero_points is None) == (first.bits, first.block_size, first.K, first.zero_points is None) for p in ps)  # fmt: skip
    if len(qs) != len(ws) or not same:
        raise UnsupportedExportError("cannot fuse projections stored in different formats into one")
    if any(q.mins is not None for q in qs):  # Q4_0 beside Q4_1 (mixed files): zero minimums
        qs = [
            q if q.mins is not None else QuantLinear(q.packed, np.zeros(q.packed.scales.shape, np.float32))
            for q in qs
        ]
    zps = [p.zero_points for p in ps]
    if any(z is not None and z.dtype != zps[0].dtype for z in zps):  # type: ignore[union-attr]
        raise UnsupportedExportError("cannot fuse projections with different zero-point types")
    packed = PackedWeight(
        np.concatenate([p.packed for p in ps]), np.concatenate([p.scales for p in ps]),
        None if zps[0] is None else np.concatenate(zps), first.bits, first.block_size, first.K,
        sum(p.N for p in ps),
    )  # fmt: skip
    mins = np.concatenate([q.mins for q in qs]) if qs[0].mins is not None else None  # type: ignore[misc]
    return QuantLinear(packed, mins)


def take_rows(w: Weight, order: list[int]) -> Weight:
    if isinstance(w, np.ndarray):
        return w[order]
    p = w.packed
    zp = None if p.zero_points is None else p.zero_points[order]
    packed = PackedWeight(p.packed[order], p.scales[order], zp, p.bits, p.block_size, p.K, p.N)
    return QuantLinear(packed, None if w.mins is None else w.mins[order])


def _is_linear(name: str) -> bool:
    return name.endswith("_proj.weight") or name == "lm_head.weight"


def float_weights(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().to(torch.float32).numpy() for k, v in state.items()}


def quantized_weights(
    state: dict[str, torch.Tensor], cfg: ModelConfig, source: Path | None, bits: int, block_size: int,
    symmetric: bool, on_tensor: Callable[[str, str], None] | None = None,
) -> dict[str, Weight]:  # fmt: skip
    """Linears (and the embedding) quantized; from the GGUF's own blocks where `source` is one."""
    report = on_tensor or (lambda name, how: None)
    direct = _gguf_blocks(source, cfg, bits) if source is not None and is_gguf(source) else {}
    out: dict[str, Weight] = {}
    for name, t in state.items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue  # the graph's head reads the embedding
        head_like = name in ("embed_tokens.weight", "lm_head.weight")
        if name in direct:
            out[name] = direct[name]
            report(name, "converted from GGUF blocks")
        elif _is_linear(name) or name == "embed_tokens.weight":
            b = 8 if head_like else bits
            out[name] = QuantLinear(
                quantize_blockwise(t.detach().float().numpy(), b, block_size if b == bits else 32, symmetric)
            )
            report(name, f"quantized to {b} bits")
        else:
            out[name] = t.detach().float().numpy()
    return out


def _gguf_blocks(path: Path, cfg: ModelConfig, bits: int) -> dict[str, QuantLinear]:
    """The GGUF tensors whose blocks carry over unchanged: Q4_0/Q4_1 for 4-bit linears, Q8_0 for the
    8-bit ones (the embedding and head at any width, every linear in 8-bit exports)."""
    g = read_gguf(path)
    out: dict[str, QuantLinear] = {}
    for name, t in g.tensors.items():
        qtype = int(t.tensor_type)
        if qtype not in GGUF_TYPES or len(t.shape) != 2:
            continue
        ours, heads = gguf_target(g, cfg, name)
        head_like = ours in ("embed_tokens.weight", "lm_head.weight")
        want = 8 if head_like else bits
        if (want == 4) != (GGUF_TYPES[qtype] in ("Q4_0", "Q4_1")):
            continue  # the file's width is not the export's: quantized from float instead
        data = np.asarray(t.data).reshape(int(t.shape[1]), -1)  # (N, row bytes)
        if qtype == Q4_1:
            # code * d + m = (code - 8) * d + (m + 8d): MatMulNBits' symmetric form (centred codes
            # keep int8-activation rounding small) plus the shifted minimums.
            p, mins = gguf_q4_1_split(data)
            sym = PackedWeight(p.packed, p.scales, None, p.bits, p.block_size, p.K, p.N)
            q = QuantLinear(sym, mins + np.float32(8) * p.scales)
        else:
            q = QuantLinear(gguf_to_packed(data, qtype))
        if heads is not None:
            q = take_rows(q, unpermute_rows(q.packed.N, heads))  # type: ignore[assignment]
        out[ours] = q
    return out
