"""Reading a Hugging Face folder (config.json + safetensors, sharded or not) as untrusted input.

`read_folder(folder)` returns the parsed config and the tensors, never unpickling anything: a `.bin`
or `.pt` checkpoint is refused. Each loader then maps the names it expects and checks every shape
against its config before building a module (`take`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

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
