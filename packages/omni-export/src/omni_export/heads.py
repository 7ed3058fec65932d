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
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from omni_export.errors import ExportError
from omni_model.files import writing_dir

HEADS_GRAPH, HEADS_DATA, HEADS_MANIFEST = "heads.onnx", "heads.onnx.data", "heads-manifest.json"
HEADS_FORMAT = "omnicoder-onnx-heads"
TOP = 4  # candidates per head in top_ids
COUNTS = (
    "token-counts.npy"  # beside heads.json: how often the base produced each token in the heads' training
)


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


def _restrict_head(
    nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], keep: np.ndarray
) -> list[onnx.TensorProto]:
    """The output head's weights cut to the rows of the tokens in `keep`: the head then scores those
    tokens only (its `logits` have len(keep) columns)."""
    head = next((n for n in nodes if "logits" in n.output), None)
    if head is None or head.op_type not in ("MatMulNBits", "MatMul"):
        raise ExportError("a reduced head vocabulary needs the output head to be one MatMul or MatMulNBits")
    by_name = {t.name: t for t in inits}

    def cut(name: str, columns: bool, n: int = 0) -> None:
        a = numpy_helper.to_array(by_name[name])
        if columns:  # (K, N) float weights
            a = a[:, keep]
        elif a.shape[0] == n:  # (N, ...) packed weights, scales, zero points, bias
            a = a[keep]
        else:  # the same, flattened to one dimension
            a = a.reshape(n, -1)[keep].reshape(-1)
        by_name[name] = numpy_helper.from_array(np.ascontiguousarray(a), name)

    if head.op_type == "MatMulNBits":
        attrs = {a.name: a for a in head.attribute}
        for i, name in enumerate(head.input):
            if name and name in by_name and i in (1, 2, 3, 5):  # weights, scales, zero points, bias
                cut(name, False, attrs["N"].i)
        attrs["N"].i = len(keep)
    else:
        w = head.input[1]
        if w not in by_name:  # float16 weights reach the MatMul through a Cast
            cast = next((n for n in nodes if w in n.output and n.op_type == "Cast"), None)
            if cast is None or cast.input[0] not in by_name:
                raise ExportError("a reduced head vocabulary needs the head's weight as an initializer")
            w = cast.input[0]
        cut(w, True)
    return list(by_name.values())


def export_heads(heads_dir: str | Path, model_folder: str | Path, out: str | Path, *,
                 vocab_size: int | None = None) -> dict[str, Any]:  # fmt: skip
    """Write the ONNX form of the heads in `heads_dir` (omni_model.medusa's format) for the decoder
    exported to `model_folder`, to the folder `out` (atomically); returns its manifest.

    `vocab_size`: the heads score only the `vocab_size` tokens the base generated most often in their
    training (the folder's token-counts.npy), as FR-Spec (Zhao et al. 2025, arXiv:2502.14856) cuts a
    drafter's head: the head's matmul, the drafting cost on a CPU, shrinks by the same factor, and a
    token outside the set is never drafted (verification still decides every token)."""
    from safetensors.numpy import load_file

    from omni_model.medusa import COUNTS, META, WEIGHTS, read_heads_meta, top_tokens

    heads_dir, model_folder, out = Path(heads_dir), Path(model_folder), Path(out)
    for p in (heads_dir / META, heads_dir / WEIGHTS):
        if not p.is_file():
            raise ExportError(f"{heads_dir}: no {p.name} (not a Medusa heads folder)")
    hcfg, dim, vocab, base, _ = read_heads_meta(heads_dir / META)
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
    graph_name = m.get("graph")
    if not isinstance(graph_name, str) or Path(graph_name).name != graph_name or graph_name.startswith("."):
        raise ExportError(f"{model_folder / 'manifest.json'}: graph must be a file name inside the folder")
    w = load_file(str(heads_dir / WEIGHTS))
    decoder = onnx.load(str(model_folder / graph_name), load_external_data=True)
    head_nodes, head_inits = _head_subgraph(decoder)
    del decoder
    keep = None
    if vocab_size is not None:
        counts_path = heads_dir / COUNTS
        if not counts_path.is_file():
            raise ExportError(
                f"{heads_dir}: no {COUNTS} (token counts of the heads' training); cannot choose a vocabulary"
            )
        try:
            counts = np.load(counts_path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ExportError(f"{counts_path}: not a readable .npy: {e}") from None
        if counts.shape != (vocab,) or not np.issubdtype(counts.dtype, np.integer) or counts.min() < 0:
            raise ExportError(
                f"{counts_path}: must hold {vocab} non-negative integer counts, got {counts.dtype} {counts.shape}"
            )
        if not 1 <= vocab_size <= vocab:
            raise ExportError(f"vocab_size must be in 1..{vocab}, got {vocab_size}")
        keep = top_tokens(counts, vocab_size)
        head_nodes = [onnx.NodeProto.FromString(n.SerializeToString()) for n in head_nodes]  # edited below
        head_inits = _restrict_head(head_nodes, head_inits, keep)

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
    ids = "top_ids" if keep is None else "top_local"
    nodes.append(helper.make_node("TopK", ["logits", const("top_k", np.array([TOP], np.int64))],
                                  ["top_values", ids], axis=-1))  # fmt: skip
    if keep is not None:  # positions in the kept set -> token ids
        nodes.append(
            helper.make_node("Gather", [const("kept_tokens", keep), "top_local"], ["top_ids"], axis=0)
        )
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
        "drafted_vocab": vocab if keep is None else len(keep),
        "model_manifest_sha256": manifest_sha256(model_folder),
    }  # fmt: skip
    with writing_dir(out, marker=HEADS_MANIFEST, what="exported heads", error=ExportError) as tmp:
        onnx.save_model(model, str(tmp / HEADS_GRAPH), save_as_external_data=True, location=HEADS_DATA,
                        size_threshold=1024)  # fmt: skip
        (tmp / HEADS_MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return manifest
