"""omni-model: config, decoder layers, checkpoint import, tokenizers, zoo and generation.

`omni_model.load(source)` opens a Hugging Face folder, a GGUF file or a zoo name and returns the
config, a `torch.nn.Module` decoder and the tokenizer. Nothing here needs `transformers`.
"""

from omni_model.config import ModelConfig, RopeConfig
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
from omni_model.loader import LoadedModel, load
from omni_model.zoo import DEFAULT_MODEL, ZOO

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
]
