"""A small ONNX graph builder: named nodes, initializers, inputs and outputs, and nothing else.

`onnx.helper` makes the protos; this keeps the bookkeeping (unique value names, initializers kept
as numpy arrays until the model is assembled) out of the decoder's graph code.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MS = "com.microsoft"  # ONNX Runtime's contrib operator domain

DTYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
          np.dtype(np.int64): TensorProto.INT64, np.dtype(np.int32): TensorProto.INT32,
          np.dtype(np.uint8): TensorProto.UINT8}  # fmt: skip


class Graph:
    def __init__(self, name: str) -> None:
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._used: set[str] = set()
        self._shared: dict[int, tuple[np.ndarray, str]] = {}  # id(array) -> (array, initializer name)

    def unique(self, hint: str) -> str:
        name, i = hint, 1
        while name in self._used:
            i += 1
            name = f"{hint}_{i}"
        self._used.add(name)
        return name

    def input(self, name: str, dtype: int, shape: Sequence[int | str]) -> str:
        self._used.add(name)
        self.inputs.append(helper.make_tensor_value_info(name, dtype, list(shape)))
        return name

    def output(self, name: str, dtype: int, shape: Sequence[int | str]) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, dtype, list(shape)))

    def const(self, hint: str, array: np.ndarray) -> str:
        """An initializer; the same array object passed twice is stored once (a tied embedding and
        head share their bytes)."""
        seen = self._shared.get(id(array))
        if seen is not None and seen[0] is array:
            return seen[1]
        name = self.unique(hint)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        self._shared[id(array)] = (array, name)
        return name

    def op(
        self, op_type: str, inputs: Sequence[str], *, outputs: Sequence[str] | int = 1, domain: str = "",
        name: str | None = None, **attrs,
    ) -> str | list[str]:  # fmt: skip
        """Add a node; returns its output name (or names when several). "" marks an absent input."""
        base = self.unique(name or op_type)
        outs = (
            [f"{base}/out{i}" if i else f"{base}/out" for i in range(outputs)]
            if isinstance(outputs, int)
            else list(outputs)
        )
        self._used.update(outs)
        attrs = {k: v for k, v in attrs.items() if v is not None}
        self.nodes.append(
            helper.make_node(op_type, list(inputs), outs, name=base, domain=domain or None, **attrs)
        )
        return outs[0] if len(outs) == 1 else outs

    def model(self, opset: int = 21, producer: str = "omni-export") -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        model = helper.make_model(
            graph, producer_name=producer,
            opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)],
        )  # fmt: skip
        model.ir_version = 10
        return model
