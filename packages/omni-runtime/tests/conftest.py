"""omni-model's tiny random checkpoints (transformers models saved with save_pretrained), shared here."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_TINY = Path(__file__).parents[2] / "omni-model" / "tests" / "tiny.py"


def _load_tiny():
    name = "omni_model_tests_tiny"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, _TINY)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


tiny = _load_tiny()
