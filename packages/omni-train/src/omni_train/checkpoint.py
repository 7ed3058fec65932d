"""Training checkpoints: everything a run needs to go on bit-for-bit, in one folder put in place atomically.

    model.safetensors      the trainable parameters and the buffers training moves (router biases)
    optimizer.safetensors  AdamW's moments and step per parameter, by parameter name
    rng.safetensors        torch's CPU generator state
    state.json             step, tokens, elapsed time, the run plan, the data position, the configs

No pickles: a checkpoint is untrusted input, read with safetensors and JSON and checked against the
model and optimizer before anything is copied in.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from omni_model.files import replace_dir
from omni_train.errors import TrainError

STATE, FORMAT, VERSION = "state.json", "omnicoder-train-checkpoint", 1


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters that require grad (shared ones once) and the persistent buffers."""
    out = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    persistent = {n for n, _ in model.state_dict(keep_vars=True).items()}
    out |= {n: b.detach() for n, b in model.named_buffers() if n in persistent}
    return {n: t.contiguous() for n, t in out.items()}


def optimizer_state(opt: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, torch.Tensor]:
    """AdamW's per-parameter tensors keyed `name/exp_avg`, `name/exp_avg_sq`, `name/step`."""
    out = {}
    for p, st in opt.state.items():
        for k, v in st.items():
            out[f"{names[id(p)]}/{k}"] = torch.as_tensor(v).detach().clone().contiguous()
    return out


def save_checkpoint(folder: Path, model: nn.Module, opt: torch.optim.Optimizer, names: dict[int, str],
                    state: dict[str, Any]) -> None:  # fmt: skip
    """Write the checkpoint to `folder`, replacing the previous one only once the new one is complete."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        save_file(trainable_state(model), str(tmp / "model.safetensors"))
        save_file(optimizer_state(opt, names), str(tmp / "optimizer.safetensors"))
        save_file({"torch": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
        # state.json last: a folder without it is never taken for a checkpoint
        (tmp / STATE).write_text(json.dumps({"format": FORMAT, "version": VERSION, **state}, indent=1))
        tmp.chmod(0o755)
        replace_dir(tmp, folder, marker=STATE, what="a training checkpoint", error=TrainError)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_state(folder: Path) -> dict[str, Any]:
    path = Path(folder) / STATE
    if not path.is_file():
        raise TrainError(f"{folder}: no {STATE} (not a training checkpoint, or one never completed)")
    try:
        st = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise TrainError(f"{path}: not readable JSON: {' '.join(str(e).split())[:120]}") from None
    if not isinstance(st, dict) or st.get("format") != FORMAT or st.get("version") != VERSION:
        raise TrainError(f"{path}: not a version-{VERSION} OmniCoder training checkpoint")
    for key, kind in (("step", int), ("tokens", int), ("elapsed_s", float), ("plan", dict), ("data", dict)):
        v = st.get(key)
        allowed = (float, int) if kind is float else (kind,)  # a JSON float may be written as an int
        if not isinstance(v, allowed) or isinstance(v, bool):
            raise TrainError(f"{path}: field {key!r} must be {kind.__name__}, got {type(v).__name__}")
    if st["step"] < 0 or st["tokens"] < 0 or not math.isfinite(st["elapsed_s"]) or st["elapsed_s"] < 0:
        raise TrainError(f"{path}: step, tokens and elapsed_s must be non-negative")
    return st


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (OSError, SafetensorError, ValueError) as e:
        raise TrainError(
            f"{path}: not a readable safetensors file: {' '.join(str(e).split())[:120]}"
        ) from None


def load_checkpoint(
    folder: Path, model: nn.Module, opt: torch.optim.Optimizer, names: dict[int, str]
) -> None:
    """Copy a checkpoint into `model` and `opt` (built for the same run) and restore the RNG; every
    tensor's name, shape and dtype is checked first."""
    folder = Path(folder)
    want = trainable_state(model)
    got = _tensors(folder / "model.safetensors")
    if set(got) != set(want):
        extra, missing = sorted(set(got) - set(want)), sorted(set(want) - set(got))
        raise TrainError(f"{folder}/model.safetensors: does not match the model (unexpected {extra[:3]}, "
                         f"missing {missing[:3]}): a checkpoint of another model")  # fmt: skip
    for n, t in got.items():
        if t.shape != want[n].shape or t.dtype != want[n].dtype:
            raise TrainError(f"{folder}/model.safetensors: {n} is {tuple(t.shape)} {t.dtype}, the model "
                             f"has {tuple(want[n].shape)} {want[n].dtype}")  # fmt: skip
    moments = _tensors(folder / "optimizer.safetensors")
    by_name = {names[id(p)]: p for g in opt.param_groups for p in g["params"]}
    for key, t in moments.items():
        name, _, k = key.rpartition("/")
        p = by_name.get(name)
        if p is None or k not in ("exp_avg", "exp_avg_sq", "step") or (k != "step" and t.shape != p.shape):
            raise TrainError(f"{folder}/optimizer.safetensors: {key} does not match the optimizer")
    rng = _tensors(folder / "rng.safetensors").get("torch")
    if rng is None or rng.dtype != torch.uint8 or rng.shape != torch.get_rng_state().shape:
        raise TrainError(f"{folder}/rng.safetensors: no torch generator state of the expected size")
    with torch.no_grad():
        params = dict(model.named_parameters()) | dict(model.named_buffers())
        for n, t in got.items():
            params[n].copy_(t)
    opt.state.clear()
    for key, t in moments.items():
        name, _, k = key.rpartition("/")
        opt.state[by_name[name]][k] = t.clone()
    torch.set_rng_state(rng)
