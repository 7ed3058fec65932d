"""omni-runtime: engines behind one protocol, numpy sampling and one generate loop.

`OrtEngine(folder)` runs an omni_export folder with onnxruntime and numpy only (no torch import);
`TorchEngine(omni_model.load(...))` runs the PyTorch decoder. `open_engine(source, kind)` picks one.
`generate` / `generate_text` work with either.
"""

from omni_runtime.engine import Engine, EngineError
from omni_runtime.generate import generate, generate_text
from omni_runtime.ort_engine import OrtEngine, read_manifest

__all__ = ["Engine", "EngineError", "OrtEngine", "generate", "generate_text", "read_manifest"]
