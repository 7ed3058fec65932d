"""Medusa-style heads as an ONNX graph beside an exported decoder, for omni_runtime's ONNX engine.

`export_heads(heads_dir, model_folder, out)` writes `heads.onnx` (+ `heads.onnx.data`) and
`heads-manifest.json`: input `hidden` (N, D), the decoder's final-normed hidden states; the heads'
residual blocks in float32; the decoder's own output head, copied node for node from its graph (so an
int4 export's 8-bit head runs on MatMulNBits as it does there); output `top_ids` (n_heads, N, top),
each head's best tokens, best first. The manifest names the decoder export it was made for (the sha256
of its manifest.json), and the runtime refuses any other.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from omni_export.errors import ExportError
from omni_model.files import replace_dir

HEADS_GRAPH, HEADS_DATA, HEADS_MANIFEST = "heads.onnx", "heads.onnx.data", "heads-manifest.json"
HEADS_FORMAT = "omnicoder-onnx-heads"
TOP = 4  # candidates per head in top_ids


def manifest_sha256(model_folder: str | Path) -> str:
    """The identity of a decoder export: the sha256 of its manifest.json."""
    path = Path(model_folder) / "manifest.json"
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as e:
        raise ExportError(f"{path}: cannot read it ({e.strerror})") from None


def _head_subgraph(model: onnx.ModelProto) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The nodes and initializers between the decoder's `hidden_states` and its `logits`."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    inits = {t.name: t for t in g.initializer}
    if "hidden_states" not in producer or "logits" not in producer:
        raise ExportError("the decoder graph has no hidden_states output; export it again with this version")
    nodes: dict[int, onnx.NodeProto] = {}
    used: dict[str, onnx.TensorProto] = {}
    stack = ["logits"]
    while stack:
        name = stack.pop()
        if name in ("hidden_states", "") or name in used:
            continue
        if name in inits:
            used[name] = inits[name]
            continue
        node = producer.get(name)
        if node is None:
            raise ExportError(f"the decoder's output head reads {name!r}, which is not the hidden state")
        if id(node) not in nodes:
            nodes[id(node)] = node
            stack.extend(node.input)
    order = {id(n): i for i, n in enumerate(g.node)}  # keep the graph's topological order
    return sorted(nodes.values(), key=lambda n: order[id(n)]), list(used.values())


def export_heads(heads_dir: str | Path, model_folder: str | Path, out: str | Path) -> dict[str, Any]:
    """Write the ONNX form of the heads in `heads_dir` (omni_model.medusa's format) for the decoder
    exported to `model_folder`, to the folder `out` (atomically); returns its manifest."""
    from safetensors.numpy import load_file

    from omni_model.medusa import META, WEIGHTS, _read_meta

    heads_dir, model_folder, out = Path(heads_dir), Path(model_folder), Path(out)
    for p in (heads_dir / META, heads_dir / WEIGHTS):
        if not p.is_file():
            raise ExportError(f"{heads_dir}: no {p.name} (not a Medusa heads folder)")
    hcfg, dim, vocab, base, _ = _read_meta(heads_dir / META)
    try:
        m = json.loads((model_folder / "manifest.json").read_text(encoding="utf-8"))
        mdim, mvocab = m["config"]["dim"], m["config"]["vocab_size"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ExportError(f"{model_folder}: not an exported model folder ({e})") from None
    if (dim, vocab) != (mdim, mvocab):
        raise ExportError(
            f"{heads_dir}: heads trained for another base ({base!r}: dim {dim}, vocabulary {vocab}); "
            f"{model_folder} has dim {mdim}, vocabulary {mvocab}"
        )
    w = load_file(str(heads_dir / WEIGHTS))
    decoder = onnx.load(str(model_folder / m["graph"]), load_external_data=True)
    head_nodes, head_inits = _head_subgraph(decoder)
    del decoder

    nodes: list[onnx.NodeProto] = []
    inits = list(head_inits)

    def const(name: str, a: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(a, name))
        return name

    stacked = []
    for j in range(hcfg.n_heads):
        x = "hidden"
        for layer in range(hcfg.layers):
            p = f"blocks.{j}.{layer}.linear."
            try:
                wt, b = (
                    np.ascontiguousarray(w[p + "weight"].T, np.float32),
                    np.asarray(w[p + "bias"], np.float32),
                )
            except KeyError as e:
                raise ExportError(f"{heads_dir / WEIGHTS}: missing tensor {e}") from None
            y, a, s, r = (f"head{j}.{layer}.{n}" for n in ("y", "a", "s", "r"))
            nodes += [
                helper.make_node("MatMul", [x, const(p + "weight_t", wt)], [y + "0"]),
                helper.make_node("Add", [y + "0", const(p + "bias", b)], [y]),
                helper.make_node("Sigmoid", [y], [s]),
                helper.make_node("Mul", [y, s], [a]),
                helper.make_node("Add", [x, a], [r]),
            ]
            x = r
        nodes.append(
            helper.make_node("Unsqueeze", [x, const(f"axis0.{j}", np.array([0], np.int64))], [f"head{j}"])
        )
        stacked.append(f"head{j}")
    nodes.append(
        helper.make_node("Concat", stacked, ["hidden_states"], axis=0)
    )  # (n, N, D): the head's input
    nodes += head_nodes
    nodes.append(helper.make_node("TopK", ["logits", const("top_k", np.array([TOP], np.int64))],
                                  ["top_values", "top_ids"], axis=-1))  # fmt: skip
    graph = helper.make_graph(
        nodes, "omnicoder_heads",
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["n", dim])],
        [helper.make_tensor_value_info("top_ids", TensorProto.INT64, [hcfg.n_heads, "n", TOP])],
        inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                              producer_name="omni-export")  # fmt: skip
    model.ir_version = 10
    manifest = {
        "format": HEADS_FORMAT, "version": 1, "graph": HEADS_GRAPH, "n_heads": hcfg.n_heads, "layers": hcfg.layers,
        "dim": dim, "vocab_size": vocab, "top": TOP, "base": base,
        "model_manifest_sha256": manifest_sha256(model_folder),
    }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        onnx.save_model(model, str(tmp / HEADS_GRAPH), save_as_external_data=True, location=HEADS_DATA,
                        size_threshold=1024)  # fmt: skip
        (tmp / HEADS_MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        replace_dir(tmp, out, marker=HEADS_MANIFEST, what="exported heads", error=ExportError)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
