"""omni-model's test helpers (tiny random checkpoints, tiny GGUF files), shared here.

They are imported as the package `omni_model_tests` (omni-model's tests folder), so that their own
relative imports work without putting that folder on sys.path.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

_TESTS = Path(__file__).parents[2] / "omni-model" / "tests"


def _package() -> None:
    if "omni_model_tests" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "omni_model_tests", _TESTS / "__init__.py", submodule_search_locations=[str(_TESTS)]
        )
        assert spec is not None
        sys.modules["omni_model_tests"] = importlib.util.module_from_spec(spec)


_package()
tiny = importlib.import_module("omni_model_tests.tiny")
tiny_gguf = importlib.import_module("omni_model_tests.tiny_gguf")
