"""Workspace-wide test setup: omni-model's test helpers (tiny random checkpoints, tiny GGUF files)
as the package `omni_model_tests`, for the other packages' tests (`from omni_model_tests import tiny`).

It is omni-model's tests folder registered under a name of its own, so the helpers' relative imports
work without putting that folder on sys.path. Under pytest-xdist (the suite runs one worker per core,
see pyproject.toml) each worker's torch gets its share of the cores, so workers do not oversubscribe.
"""

from __future__ import annotations

import importlib.util
import os
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


def _share_cores() -> None:
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if os.environ.get("PYTEST_XDIST_WORKER") and workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


_share_cores()
