"""Checkpoints as untrusted input: Hugging Face folders, and our own one-file checkpoints.

`read_folder(folder)` returns the parsed config and the tensors of a Hugging Face folder (config.json +
safetensors, sharded or not), never unpickling anything: a `.bin` or `.pt` checkpoint is refused. Each
loader then maps the names it expects and checks every shape against its config before building a
module (`take`). The trainable tokenizers (image, codec, interpolator) are saved as one .safetensors
file with a format name and their config as JSON in its metadata (`save_with_config`,
`read_with_config`); each loader checks the format, the config and every tensor against it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from omni_media.errors import MediaError


def read_config(folder: Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise MediaError(f"{folder}: no config.json (a Hugging Face model folder is expected)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise MediaError(f"{path}: not readable JSON: {' '.join(str(e).split())[:200]}") from None
    if not isinstance(cfg, dict):
        raise MediaError(f"{path}: not a JSON object")
    return cfg


def read_folder(folder: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config.json as a dict, every tensor of the folder's safetensors files)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    if not folder.is_dir():
        raise MediaError(f"{folder}: no such folder")
    cfg = read_config(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        why = f" ({', '.join(pickled)} are pickles, never loaded)" if pickled else ""
        raise MediaError(f"{folder}: no .safetensors weights{why}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as e:
            raise MediaError(
                f"{f}: not a readable safetensors file: {' '.join(str(e).split())[:200]}"
            ) from None
    return cfg, state


def take(
    state: dict[str, torch.Tensor], name: str, shape: tuple[int, ...], origin: Path | str
) -> torch.Tensor:
    """The tensor `name` as float32, checked to have `shape`."""
    t = state.get(name)
    if t is None:
        raise MediaError(f"{origin}: missing tensor {name!r}")
    if tuple(t.shape) != tuple(shape):
        raise MediaError(
            f"{origin}: tensor {name!r} has shape {tuple(t.shape)}, the config implies {tuple(shape)}"
        )
    return t.float()


def config_int(cfg: dict[str, Any], key: str, origin: Path | str, default: int | None = None, lo: int = 1,
               hi: int = 1 << 20) -> int:  # fmt: skip
    """An integer field of a config within [lo, hi]; MediaError naming the file and key otherwise."""
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise MediaError(f"{origin}: {key} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def save_with_config(module: nn.Module, config: Any, fmt: str, path: str | Path) -> Path:
    """`module`'s tensors in one .safetensors file with `fmt` and the dataclass `config` (as JSON) in its
    metadata, written under a temporary name in the same folder and renamed: never half a file."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    meta = {"format": fmt, "config": json.dumps(dataclasses.asdict(config))}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata=meta)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 is for the temporary name only
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def read_with_config(path: str | Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a .safetensors file, nothing unpickled; MediaError naming it otherwise."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise MediaError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise MediaError(
            f"{path}: not a readable safetensors file: {' '.join(str(e).split())[:200]}"
        ) from None
    return meta, state
