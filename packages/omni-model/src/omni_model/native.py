"""OmniCoder's own checkpoint folder: a model we trained, written so that `omni_model.load` opens it.

    omnicoder.json      format + version, the full ModelConfig, the weights' dtype, caller's meta
    model.safetensors   the plain Decoder's state_dict() under its own names (a tied head stored once)
    tokenizer*.json     Tokenizer.save's files, when a tokenizer is given

Every ModelConfig field is written, nested ones (rope, mla, moe) included, so the folder needs no
family name or foreign-key mapping. The JSON is untrusted when read back: each value is checked
against the dataclass field's type (no eval, no pickle) before the dataclasses validate the bounds.
A save writes a temporary folder and renames it into place, as exports and indices do.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file

from omni_model.checkpoint.fields import short
from omni_model.checkpoint.hf import iter_safetensors, read_json
from omni_model.config import ModelConfig
from omni_model.decoder import Decoder
from omni_model.errors import CheckpointError, ConfigError
from omni_model.files import writing_dir
from omni_model.fused import FusedBlock
from omni_model.tokenizer import Tokenizer

MANIFEST, WEIGHTS = "omnicoder.json", "model.safetensors"
FORMAT, VERSION = "omnicoder-checkpoint", 1


def save(
    model: Decoder,
    folder: str | Path,
    *,
    tokenizer: Tokenizer | None = None,
    meta: dict[str, Any] | None = None,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write `model` (plain form), its config and `tokenizer` to `folder`, atomically; returns the folder.

    `meta` (JSON: what trained it, on what data) is stored as given; `extra(tmp)` may write more files
    into the new folder before it is put in place (a multimodal model's encoders and tokenizers). An existing `folder` is replaced
    only when it is an omnicoder checkpoint, and only once the new one is complete."""
    if not isinstance(model, Decoder):
        raise TypeError(f"save takes a Decoder (LoadedModel.model), got {type(model).__name__}")
    out = Path(folder)
    if out.exists() and not (out / MANIFEST).is_file():
        raise CheckpointError(
            f"{out}: exists and is not an omnicoder checkpoint (no {MANIFEST}); not overwriting it"
        )
    cfg, state = model.config, _state(model)
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in state.values()})
    manifest = {"format": FORMAT, "version": VERSION, "config": config_to_dict(cfg),
                "dtype": dtypes[0] if len(dtypes) == 1 else dtypes, "meta": meta or {}}  # fmt: skip
    text = json.dumps(manifest, indent=1, allow_nan=False)  # a meta that is not JSON fails before any write
    with writing_dir(out, marker=MANIFEST, what="an omnicoder checkpoint", error=CheckpointError) as tmp:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp)
        if extra is not None:
            extra(tmp)
        (tmp / MANIFEST).write_text(text, encoding="utf-8")
    return out


def _state(model: Decoder) -> dict[str, torch.Tensor]:
    """The state dict to write: checked against the config, tied head dropped, no shared storage."""
    cfg = model.config
    if any(isinstance(m, FusedBlock) for m in model.layers):
        raise CheckpointError(
            "the model is in its fused inference form (omni_model.fused), whose weights no longer match the "
            "checkpoint names; save the plain one (omni_model.load(..., fuse=False), or the trained Decoder)"
        )
    # The names and shapes the config implies. Uninitialised storage is never written, so never resident
    # (a meta-device build would import torch._dynamo for the rotary tables: seconds).
    expected = {k: tuple(v.shape) for k, v in Decoder(cfg, init=False).state_dict().items()}
    state = model.state_dict()
    if cfg.tie_embeddings:
        if model.lm_head.weight.data_ptr() != model.embed_tokens.weight.data_ptr():
            raise CheckpointError(
                "config.tie_embeddings is set but lm_head.weight is not embed_tokens.weight"
            )
        del state["lm_head.weight"], expected["lm_head.weight"]
    if sorted(state) != sorted(expected):
        diff = sorted(set(state) ^ set(expected))
        raise CheckpointError(
            f"the model's tensors do not match its config: {diff[0]!r} ({len(diff)} in all)"
        )
    out, seen = {}, set()
    for name, t in state.items():
        if tuple(t.shape) != expected[name]:
            raise CheckpointError(
                f"tensor {name!r} has shape {tuple(t.shape)}, the config implies {expected[name]}"
            )
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        # safetensors refuses tensors that share memory (views of one weight, say): store a copy.
        out[name] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out


def read_config(folder: Path) -> tuple[ModelConfig, dict[str, Any]]:
    """The config and meta of an omnicoder folder; a bad manifest is a one-line typed error naming it."""
    path = folder / MANIFEST
    manifest = read_json(path)
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format is {short(manifest.get('format'))}, not {FORMAT!r}")
    version = manifest.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= VERSION:
        raise CheckpointError(
            f"{path}: version {short(version)} is not one this omni-model reads (1..{VERSION})"
        )
    meta = manifest.get("meta", {})
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: meta must be a JSON object, got {short(meta)}")
    try:
        return config_from_dict(manifest.get("config")), meta
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of an omnicoder folder, by our own names (checked against the config by `loader.build`)."""
    return dict(iter_safetensors([folder / WEIGHTS]))


# ---- ModelConfig <-> JSON -----------------------------------------------------------------------------


def config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
    """Every field of `cfg`, nested configs as objects and tuples as lists: plain JSON."""
    return _plain(cfg)


def _plain(v: Any) -> Any:
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    return [_plain(x) for x in v] if isinstance(v, tuple) else v


def config_from_dict(d: Any) -> ModelConfig:
    """The ModelConfig `config_to_dict` wrote; a missing, unknown or mistyped key is a ConfigError naming it.
    Keys with a default may be absent (configs written before a field existed)."""
    return _dataclass(ModelConfig, d, "config")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _dataclass(cls: type, d: Any, where: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be a JSON object, got {short(d)}")
    hints = _hints(cls)
    unknown = [k for k in d if k not in hints]
    if unknown:
        raise ConfigError(f"{where} has the unknown key {short(unknown[0])}")
    kw = {}
    for f in dataclasses.fields(cls):
        if f.name in d:
            kw[f.name] = _value(hints[f.name], d[f.name], f"{where}.{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where} lacks the required key {f.name!r}")
    try:
        return cls(**kw)
    except (ValueError, TypeError) as e:  # ConfigError, omni_moe's MoEConfigError: bounds and consistency
        raise ConfigError(f"{where}: {' '.join(str(e).split())}") from None


def _value(tp: Any, v: Any, where: str) -> Any:
    """`v` as a value of field type `tp`: int, float, bool, Literal, X | None, tuple[X, ...], dataclass."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):  # X | None
        if v is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _value(inner, v, where)
    if origin is Literal:
        if not (isinstance(v, str) and v in args):
            raise ConfigError(f"{where} must be one of {', '.join(map(str, args))}; got {short(v)}")
        return v
    if origin is tuple:  # tuple[int, ...]
        if not isinstance(v, list):
            raise ConfigError(f"{where} must be a list, got {short(v)}")
        return tuple(_value(args[0], x, f"{where}[{i}]") for i, x in enumerate(v))
    if dataclasses.is_dataclass(tp):
        return _dataclass(tp, v, where)
    if tp is bool and isinstance(v, bool):
        return v
    if tp is int and isinstance(v, int) and not isinstance(v, bool):
        return v
    if tp is float and isinstance(v, int | float) and not isinstance(v, bool):
        try:
            if math.isfinite(float(v)):
                return float(v)
        except OverflowError:  # an int beyond float range
            pass
    if tp not in (bool, int, float):
        raise TypeError(f"{where}: no JSON form for the field type {tp!r}")  # a new kind of field
    what = {bool: "true or false", int: "an integer", float: "a finite number"}[tp]
    raise ConfigError(f"{where} must be {what}, got {short(v)}")
