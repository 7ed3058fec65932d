"""An ONNX export folder in ONNX Runtime's mobile format: `model.ort` plus the operator list a reduced
ONNX Runtime build for the phone needs.

ONNX Runtime Mobile loads the ORT format (a flatbuffer, the weights inside it) without the ONNX parser
and protobuf. The conversion is ONNX Runtime's own: a session optimizes the graph and saves it in that
format. Optimizations stop at the extended level, which holds the contrib-op fusions and nothing tied
to the converting CPU (layout transforms are left to the phone's session). `required_operators.config`
lists every operator the graph uses, the input of a minimal build (`--include_ops_by_config`). The
folder keeps the ONNX export's manifest with `graph` pointing at model.ort, so the same engine opens it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import onnxruntime as ort

from omni_export.errors import ExportError
from omni_model.files import writing_dir

ORT_MODEL, OPS_CONFIG, MANIFEST = "model.ort", "required_operators.config", "manifest.json"


def convert_to_ort(onnx_folder: str | Path, out: str | Path, *, arm: bool = True) -> dict[str, Any]:
    """Write `out` with model.ort, required_operators.config, the tokenizer files and the manifest of
    the ONNX export `onnx_folder` (graph renamed). `arm`: allow int8 QDQ kernels as ARM CPUs run them.
    Returns the new manifest."""
    from onnxruntime.tools.ort_format_model import create_config_from_models

    src = Path(onnx_folder)
    try:
        manifest = json.loads((src / MANIFEST).read_text(encoding="utf-8"))
        graph = src / manifest["graph"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ExportError(f"{src}: not an ONNX export folder ({' '.join(str(e).split())[:120]})") from None
    if manifest.get("format") != "omnicoder-onnx":
        raise ExportError(f"{src / MANIFEST}: not an OmniCoder ONNX manifest")
    with writing_dir(Path(out), marker=MANIFEST, what="an ORT-format export", error=ExportError) as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(tmp / ORT_MODEL)
        so.add_session_config_entry("session.save_model_format", "ORT")
        so.add_session_config_entry("session.qdqisint8allowed", "1" if arm else "0")
        so.log_severity_level = 3
        try:
            ort.InferenceSession(str(graph), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT's own exception types
            raise ExportError(
                f"{graph}: ONNX Runtime cannot convert it: {' '.join(str(e).split())[:200]}"
            ) from None
        log = logging.getLogger("ort_format_model.utils")  # it logs the config's path at INFO
        level, log.level = log.level, logging.WARNING
        try:
            create_config_from_models([tmp / ORT_MODEL], tmp / OPS_CONFIG, False)
        finally:
            log.setLevel(level)
        config = tmp / OPS_CONFIG  # its comment names the model by the temporary path: name it as shipped
        config.write_text(
            config.read_text(encoding="utf-8").replace(str(tmp / ORT_MODEL), ORT_MODEL), encoding="utf-8"
        )
        for name in manifest.get("tokenizer", {}).get("files", []):
            if (src / name).is_file() and "/" not in name:
                (tmp / name).write_bytes((src / name).read_bytes())
        manifest = manifest | {"graph": ORT_MODEL, "weights_file": None, "ort_format": {
            "optimization": "extended (no layout transforms)", "qdq_int8_allowed": arm,
            "operators_config": OPS_CONFIG}, "file_bytes": (tmp / ORT_MODEL).stat().st_size}  # fmt: skip
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return manifest
