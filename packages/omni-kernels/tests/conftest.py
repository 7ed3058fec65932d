"""One-node ONNX Runtime MatMulNBits graphs, for the packing tests to run their weights through."""

from collections.abc import Callable

import numpy as np
import pytest


@pytest.fixture(scope="session")
def matmulnbits() -> Callable[..., np.ndarray]:
    """run(p, a, offsets=None, accuracy_level=0): A @ W.T by com.microsoft MatMulNBits on ORT's CPU provider.

    offsets (N, k_blocks) adds blocksum(A) @ offsets.T, the second half of a split GGUF Q4_1 weight.
    """
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    def run(p, a: np.ndarray, offsets: np.ndarray | None = None, accuracy_level: int = 0) -> np.ndarray:
        inits = [numpy_helper.from_array(p.packed, "B"), numpy_helper.from_array(p.scales, "scales")]
        inputs = ["A", "B", "scales"]
        if p.zero_points is not None:
            inits.append(numpy_helper.from_array(p.zero_points, "zero_points"))
            inputs.append("zero_points")
        y = "Y" if offsets is None else "Yq"
        nodes = [
            helper.make_node(
                "MatMulNBits",
                inputs,
                [y],
                domain="com.microsoft",
                accuracy_level=accuracy_level,
                **p.attributes,
            )
        ]
        if offsets is not None:
            inits += [
                numpy_helper.from_array(np.array([-1, p.k_blocks, p.block_size], np.int64), "blocks"),
                numpy_helper.from_array(np.array([-1], np.int64), "last"),
                numpy_helper.from_array(np.ascontiguousarray(offsets.T), "offsets_t"),  # (kb, N)
            ]
            nodes += [
                helper.make_node("Reshape", ["A", "blocks"], ["Ab"]),  # (M, kb, bs)
                helper.make_node("ReduceSum", ["Ab", "last"], ["As"], keepdims=0),  # (M, kb)
                helper.make_node("MatMul", ["As", "offsets_t"], ["Ym"]),  # (M, N)
                helper.make_node("Add", ["Yq", "Ym"], ["Y"]),
            ]
        graph = helper.make_graph(
            nodes,
            "matmulnbits",
            [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, p.K])],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, p.N])],
            initializer=inits,
        )
        opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
        model = helper.make_model(graph, opset_imports=opsets)
        onnx.checker.check_model(model)
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return sess.run(None, {"A": np.ascontiguousarray(a, np.float32)})[0]

    return run
