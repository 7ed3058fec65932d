"""omni-model: config, decoder layers, checkpoint import, tokenizers, zoo and generation.

`omni_model.load(source)` opens a Hugging Face folder, a GGUF file or a zoo name and returns the
config, a `torch.nn.Module` decoder and the tokenizer; `omni_model.save(model, folder)` writes a
model we trained as an omnicoder folder that `load` opens again. Nothing here needs `transformers`.

The torch-backed names (`load`, `save`, `LoadedModel`, `ModelConfig`, `RopeConfig`) are imported on
first use, so that torch-free modules (`omni_model.tokenizer`, `omni_model.errors`, `omni_model.zoo`)
serve a process that runs an exported graph without importing torch.
"""

from typing import TYPE_CHECKING, Any

from omni_model.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    GenerationError,
    OmniError,
    TemplateError,
    TokenizerError,
    UnsupportedArchitectureError,
)
from omni_model.zoo import DEFAULT_MODEL, ZOO

if TYPE_CHECKING:
    from omni_model.config import ModelConfig, RopeConfig
    from omni_model.loader import LoadedModel, load
    from omni_model.native import save

_LAZY = {"ModelConfig": "omni_model.config", "RopeConfig": "omni_model.config",
         "LoadedModel": "omni_model.loader", "load": "omni_model.loader",
         "save": "omni_model.native"}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'omni_model' has no attribute {name!r}")


__all__ = [
    "DEFAULT_MODEL",
    "ZOO",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "GenerationError",
    "LoadedModel",
    "ModelConfig",
    "OmniError",
    "RopeConfig",
    "TemplateError",
    "TokenizerError",
    "UnsupportedArchitectureError",
    "load",
    "save",
]
