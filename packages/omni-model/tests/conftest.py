"""Tiny valid checkpoints, built once per test module, for tests to break."""

from __future__ import annotations

from pathlib import Path

import pytest

from .tiny import save_tiny
from .tiny_gguf import tiny_llama_gguf


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hf") / "tiny"
    save_tiny("llama", folder)
    return folder


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> Path:
    return tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
