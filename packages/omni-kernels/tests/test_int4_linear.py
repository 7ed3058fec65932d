"""Int4Linear against a float matmul by the same dequantized weight, and the nn.Linear -> Int4Linear transform."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import omni_kernels.int4_linear as int4_linear
from omni_kernels import (
    Int4Linear,
    KernelError,
    PackedWeight,
    dequantize,
    gguf_to_packed,
    quantize_blockwise,
    quantize_linears_int4,
)

# float32 sums in another order; bfloat16 rounds x, scales and zeros to 8 significant bits.
REL_TOL = {torch.float32: 1e-5, torch.bfloat16: 2**-6}


def _assert_matches(y: torch.Tensor, x: torch.Tensor, p: PackedWeight, tol: float, bias=None) -> None:
    w = torch.from_numpy(dequantize(p)).double()
    ref = x.double() @ w.T + (0 if bias is None else bias.double())
    scale = x.double().abs() @ w.abs().T  # the size of the terms, not of their sum
    err = (y.double() - ref).abs()
    assert (err <= tol * scale + 1e-6).all(), f"max err {err.max().item()} (scale {scale.max().item()})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(("n", "k", "group_size"), [(48, 96, 32), (40, 256, 128), (16, 512, 256)])
def test_matches_dequantized_matmul(n: int, k: int, group_size: int, dtype: torch.dtype) -> None:
    torch.manual_seed(n + k)
    linear = nn.Linear(k, n)
    q = Int4Linear.from_linear(linear, group_size, dtype)
    x = torch.randn(2, 3, k)
    with torch.no_grad():
        y = q(x)
    assert y.shape == (2, 3, n) and y.dtype == torch.float32
    p = quantize_blockwise(linear.weight.detach().numpy(), 4, group_size, symmetric=False)
    _assert_matches(y.reshape(-1, n), x.reshape(-1, k), p, REL_TOL[dtype], linear.bias.detach())


def test_takes_symmetric_and_gguf_weights() -> None:
    gguf = pytest.importorskip("gguf")
    q4_0, q4_1 = gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1
    w = np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32)
    x = torch.randn(3, 64)
    for p in (
        quantize_blockwise(w, 4, 32, symmetric=True),
        gguf_to_packed(gguf.quants.quantize(w, q4_0), q4_0),
        gguf_to_packed(gguf.quants.quantize(w, q4_1), q4_1),  # float zero points
    ):
        _assert_matches(Int4Linear(p, dtype=torch.float32)(x), x, p, REL_TOL[torch.float32])


def test_rejects_layouts_torch_cannot_run() -> None:
    w = np.ones((16, 96), np.float32)
    for p in (
        quantize_blockwise(w, 8, 32),
        quantize_blockwise(w, 4, 16),
        quantize_blockwise(w[:, :80], 4, 32),
    ):
        with pytest.raises(KernelError, match="Int4Linear needs"):
            Int4Linear(p)
    with pytest.raises(KernelError, match="group_size"):
        quantize_linears_int4(nn.Linear(32, 32), group_size=16)


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleDict({"up_proj": nn.Linear(64, 128), "down_proj": nn.Linear(128, 64, bias=False)})
            for _ in range(2)
        )
        self.odd = nn.Linear(64, 40)  # K = 64 fits; N = 40 is padded to 48 inside
        self.ragged = nn.Linear(40, 64)  # K = 40 does not divide by 32: stays float
        self.lm_head = nn.Linear(64, 100, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer["down_proj"](F.silu(layer["up_proj"](x)))
        return self.lm_head(x + self.ragged(self.odd(x)))


def test_transform_replaces_linears() -> None:
    torch.manual_seed(0)
    model = _Tiny()
    x = torch.randn(1, 5, 64)
    with torch.no_grad():
        before = model(x)
    out = quantize_linears_int4(model, group_size=32, skip=("lm_head", "layers.1.down_proj"))
    assert out is model
    kinds = {
        name: type(m).__name__ for name, m in model.named_modules() if isinstance(m, nn.Linear | Int4Linear)
    }
    assert kinds == {
        "layers.0.up_proj": "Int4Linear",
        "layers.0.down_proj": "Int4Linear",
        "layers.1.up_proj": "Int4Linear",
        "layers.1.down_proj": "Linear",
        "odd": "Int4Linear",
        "ragged": "Linear",
        "lm_head": "Linear",
    }
    with torch.no_grad():
        after = model(x)
    assert after.shape == before.shape
    # 4-bit error in four layers, not a broken layout (which gives errors the size of the outputs)
    assert (after - before).abs().max() < 0.1 * before.abs().max()


def test_falls_back_to_dequantized_weight(monkeypatch) -> None:
    monkeypatch.setattr(int4_linear, "has_int4_cpu_kernel", lambda: False)
    p = quantize_blockwise(np.random.default_rng(1).standard_normal((8, 64)).astype(np.float32), 4, 32, False)
    q = Int4Linear(p, dtype=torch.float32)
    assert not q.uses_int4_kernel
    x = torch.randn(2, 64)
    _assert_matches(q(x), x, p, REL_TOL[torch.float32])
