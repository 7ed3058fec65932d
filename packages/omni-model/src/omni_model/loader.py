"""`load(source)`: a Hugging Face folder, an omnicoder folder (`omni_model.native`), a GGUF file or a
zoo name -> config, model and tokenizer.

Weights are checked against the config before they touch the model: a missing, unexpected or
wrongly shaped tensor is a CheckpointError naming the file and the tensor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from omni_model.checkpoint.gguf import config_from_gguf, gguf_state_dict
from omni_model.checkpoint.gguf_file import is_gguf, read_gguf
from omni_model.checkpoint.hf import config_from_hf, convert_weights, hf_state_dict, read_json
from omni_model.config import ModelConfig
from omni_model.decoder import Decoder
from omni_model.errors import CheckpointError, ConfigError
from omni_model.fused import fuse_for_inference
from omni_model.native import MANIFEST, read_config, read_weights
from omni_model.tokenizer import Tokenizer
from omni_model.zoo import resolve


@dataclass
class LoadedModel:
    config: ModelConfig
    model: Decoder
    tokenizer: Tokenizer
    source: str


def load(source: str | Path, *, dtype: torch.dtype = torch.float32, fuse: bool = True) -> LoadedModel:
    """Load a model in eval mode from a folder, a .gguf file or a zoo name.

    `fuse=True` (the default) returns the fast inference form (`omni_model.fused`); `fuse=False`
    the plain decoder whose module names match the checkpoint, for training and export.
    """
    path = resolve_source(source)
    if path.is_dir():
        cfg, state, tok = _from_folder(path)
    elif is_gguf(path):
        g = read_gguf(path)
        cfg = config_from_gguf(g)
        tok = Tokenizer.from_gguf_metadata(g.metadata, path)
        state = gguf_state_dict(g, cfg)
        del g  # the memory-mapped file and its parsed metadata are no longer needed
    elif path.suffix == ".safetensors":
        raise CheckpointError(
            f"{path}: a bare safetensors file has no config; pass its folder (with config.json)"
        )
    else:
        raise CheckpointError(f"{path}: neither a GGUF file nor a folder with config.json and safetensors")
    model = build(cfg, state, path, dtype)
    del state  # the model holds the tensors now; fusing can free the plain ones block by block
    if fuse:
        model = fuse_for_inference(model)
    return LoadedModel(cfg, model, tok, str(source))


def resolve_source(source: str | Path) -> Path:
    """The file or folder a source names: a path as given, else a zoo name's file."""
    path = Path(source)
    if path.exists():
        return path
    if isinstance(source, str) and "/" not in source and not source.endswith((".gguf", ".safetensors")):
        return resolve(source)  # a zoo name; an unknown one raises, listing the known ones
    raise CheckpointError(f"{source}: no such file or folder")


def load_config(source: str | Path) -> ModelConfig:
    """Only the architecture of a source (no weights are read): what a plan or a cache check needs."""
    path = resolve_source(source)
    if path.is_dir():
        if (path / MANIFEST).is_file():
            return read_config(path)[0]
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise CheckpointError(f"{path}: no config.json")
        try:
            return config_from_hf(read_json(cfg_path))
        except (ConfigError, CheckpointError) as e:
            raise type(e)(f"{cfg_path}: {e}") from None
    if is_gguf(path):
        return config_from_gguf(read_gguf(path))
    raise CheckpointError(f"{path}: neither a GGUF file nor a folder with config.json and safetensors")


def load_tokenizer(source: str | Path) -> Tokenizer:
    """Only the tokenizer of a source (no weights are read)."""
    path = resolve_source(source)
    if path.is_dir():
        return Tokenizer.from_hf_folder(path)
    if is_gguf(path):
        return Tokenizer.from_gguf_metadata(read_gguf(path).metadata, path)
    raise CheckpointError(f"{path}: neither a GGUF file nor a folder with config.json and safetensors")


def _from_folder(folder: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    if (folder / MANIFEST).is_file():  # ours: our names and config, nothing to convert
        cfg, _ = read_config(folder)
        tok = Tokenizer.from_hf_folder(folder)
        return cfg, read_weights(folder), tok
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{folder}: no config.json")
    hf = read_json(cfg_path)  # its errors name the file already
    try:
        cfg = config_from_hf(hf)
    except ConfigError as e:
        raise ConfigError(f"{cfg_path}: {e}") from None
    except CheckpointError as e:
        raise type(e)(f"{cfg_path}: {e}") from None
    tok = Tokenizer.from_hf_folder(folder)
    try:
        cfg, state = convert_weights(hf_state_dict(folder), cfg, hf)
    except CheckpointError as e:
        raise CheckpointError(f"{folder}: {e}") from None
    return cfg, state, tok


def build(cfg: ModelConfig, state: dict[str, torch.Tensor], origin: Path, dtype: torch.dtype) -> Decoder:
    """Instantiate the decoder and fill it with `state`, checking every name and shape first."""
    _check_sizes(cfg, state, origin)
    # Uninitialised storage that `assign` replaces: it is never written, so never resident.
    model = Decoder(cfg, init=False)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight")
        state.pop("lm_head.weight", None)  # some tied checkpoints still store a copy
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise CheckpointError(f"{origin}: missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    if unexpected:
        raise CheckpointError(f"{origin}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all)")
    for name, shape in expected.items():
        if tuple(state[name].shape) != tuple(shape):
            raise CheckpointError(
                f"{origin}: tensor {name!r} has shape {tuple(state[name].shape)}, the config implies {tuple(shape)}"
            )
        if not state[name].is_floating_point():
            raise CheckpointError(f"{origin}: tensor {name!r} has non-float dtype {state[name].dtype}")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.to(dtype).eval()


_LAYER = re.compile(r"^layers\.(\d+)\.")


def _check_sizes(cfg: ModelConfig, state: dict[str, torch.Tensor], origin: Path) -> None:
    """Bound the config by the weights before a model is built from it.

    A corrupted or hostile size (a billion layers, a 2^31-row embedding) would otherwise hang while
    building the blocks, allocate far more memory than the file holds, or overflow int64 inside torch;
    the weights themselves are bounded by the file.
    """
    layers = {int(m.group(1)) for name in state if (m := _LAYER.match(name))}
    if cfg.n_layers > len(layers):
        first = next(i for i in range(cfg.n_layers) if i not in layers)
        raise CheckpointError(
            f"{origin}: missing tensor 'layers.{first}.*': the config has {cfg.n_layers} layers, "
            f"the weights {len(layers)}"
        )
    held = sum(t.numel() for t in state.values())
    # Within 2x, building the model costs little and the checks that follow name the tensor.
    if cfg.n_params() > 2 * held:
        raise CheckpointError(
            f"{origin}: the config implies {cfg.n_params():,} parameters but the weights hold {held:,}: "
            "the tensor shapes do not match the config"
        )
