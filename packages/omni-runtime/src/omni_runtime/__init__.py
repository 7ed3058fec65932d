"""omni-runtime: engines behind one protocol, numpy sampling and one generate loop.

`OrtEngine(folder)` runs an omni_export folder with onnxruntime and numpy only (no torch import);
`TorchEngine(omni_model.load(...))` runs the PyTorch decoder. `open_engine(source, kind)` picks one.
`generate` / `generate_text` work with either.

Names load on first use, so a process that only runs an engine on token ids (a phone-like runtime,
the benchmark's worker) does not pay for the tokenizer and template libraries the generate loop needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from omni_runtime.engine import Engine, EngineError

if TYPE_CHECKING:
    from omni_runtime.generate import generate, generate_text
    from omni_runtime.ort_engine import OrtEngine, read_manifest

_LAZY = {"generate": "omni_runtime.generate", "generate_text": "omni_runtime.generate",
         "OrtEngine": "omni_runtime.ort_engine", "read_manifest": "omni_runtime.ort_engine"}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'omni_runtime' has no attribute {name!r}")


__all__ = ["Engine", "EngineError", "OrtEngine", "generate", "generate_text", "read_manifest"]
