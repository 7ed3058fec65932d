"""Workspace-wide test setup: omni-model's test helpers (tiny random checkpoints, tiny GGUF files)
as the package `omni_model_tests`, for the other packages' tests (`from omni_model_tests import tiny`).

It is omni-model's tests folder registered under a name of its own, so the helpers' relative imports
work without putting that folder on sys.path.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_TESTS = Path(__file__).parent / "packages" / "omni-model" / "tests"


def _package() -> None:
    if "omni_model_tests" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "omni_model_tests", _TESTS / "__init__.py", submodule_search_locations=[str(_TESTS)]
        )
        assert spec is not None
        sys.modules["omni_model_tests"] = importlib.util.module_from_spec(spec)


_package()
