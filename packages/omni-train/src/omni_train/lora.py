"""LoRA (Hu et al. 2021, arXiv:2106.09685): low-rank adapters on the frozen linears of a decoder.

`apply_lora` wraps the matching `nn.Linear`s of a plain Decoder (`omni_model.load(src, fuse=False)`)
in `LoRALinear`, y = W x + (alpha / r) B A x with B = 0 at init, and freezes everything else, so only
A and B train and save (`adapter.safetensors` + `adapter.json`, naming the base they belong to).
`LoRALinear.weight` is the effective weight W + (alpha / r) B A: code that reads a projection's weight
directly (MLA's absorbed path reads `kv_b_proj.weight`) sees the adapted layer. `strip_lora` folds the
adapters into plain Linears again, for export.
Targets match attention and dense MLP projections (GQA and MLA, MTP blocks, MoE shared experts). Routed
MoE experts are stacked 3-D parameters (`omni_moe.Experts`) and the router a bare weight: not targeted.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from omni_model.files import replace_dir
from omni_model.fused import FusedBlock
from omni_model.fused import Linear as FusedLinear
from omni_train.errors import TrainError

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                   "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")  # fmt: skip
WEIGHTS, META = "adapter.safetensors", "adapter.json"
FORMAT, VERSION = "omni-lora", 1
MAX_META_BYTES = 1 << 20  # adapter.json lists a config and module names: kilobytes


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # on the adapter's input only
    targets: tuple[str, ...] = DEFAULT_TARGETS  # fnmatch patterns on qualified module names, or name suffixes

    def __post_init__(self) -> None:
        if not _is_int(self.rank) or self.rank < 1:
            raise TrainError(f"LoRAConfig.rank must be an integer >= 1, got {self.rank!r}")
        if not _is_num(self.alpha) or not _finite(self.alpha) or self.alpha <= 0:
            raise TrainError(f"LoRAConfig.alpha must be a finite number > 0, got {self.alpha!r}")
        if not _is_num(self.dropout) or not 0 <= self.dropout < 1:
            raise TrainError(f"LoRAConfig.dropout must be a number in [0, 1), got {self.dropout!r}")
        t = self.targets
        if not isinstance(t, (tuple, list)) or not t or not all(isinstance(p, str) and p for p in t):
            raise TrainError(
                f"LoRAConfig.targets must be a non-empty tuple of module-name patterns, got {t!r}"
            )
        object.__setattr__(self, "targets", tuple(t))


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update: base(x) + scale * B A dropout(x)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base, self.rank, self.alpha, self.scale = base, rank, alpha, alpha / rank
        self.in_features, self.out_features = base.in_features, base.out_features
        like = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **like))  # (r, in)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init, as the paper's code
        # B = 0: the wrapped layer equals the base until the first step.
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **like))  # (out, r)
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        base.requires_grad_(False)

    @property
    def weight(self) -> Tensor:
        """The effective weight (out, in): the base's plus the update, unless that is merged in."""
        return self.base.weight if self.merged else self.base.weight + self.delta()

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    def delta(self) -> Tensor:
        """The update scale * B A, (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scale

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if self.merged:
            return y
        return y + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scale

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight; a no-op when it is merged already."""
        if not self.merged:
            self.base.weight.add_(self.delta().to(self.base.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update out of the base weight again; a no-op when it is not merged."""
        if self.merged:
            self.base.weight.sub_(self.delta().to(self.base.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, merged={self.merged}"


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Freeze `model` and wrap its Linears that match `cfg.targets` in LoRALinear (in place); their names."""
    if adapters(model):
        raise TrainError("the model has LoRA adapters already; strip_lora it or start from a fresh base")
    found = _find(model, cfg)
    model.requires_grad_(False)
    for name, linear in found.items():
        _replace(model, name, LoRALinear(linear, cfg.rank, cfg.alpha, cfg.dropout))
    return list(found)


def adapters(model: nn.Module) -> dict[str, LoRALinear]:
    """The LoRALinear modules of `model` by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (inference without the extra matmuls)."""
    for m in _required(model).values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Take every merged adapter out of its base weight again."""
    for m in _required(model).values():
        m.unmerge()


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter tensors only: `{name}.lora_A` (r, in) and `{name}.lora_B` (out, r) per wrapped module."""
    out = {}
    for n, m in _required(model).items():
        out[f"{n}.lora_A"], out[f"{n}.lora_B"] = m.lora_A.detach(), m.lora_B.detach()
    return out


def strip_lora(model: nn.Module) -> nn.Module:
    """Replace each LoRALinear by its base Linear with the update merged in (for export); in place."""
    for name, m in adapters(model).items():
        m.merge()
        _replace(model, name, m.base)
    return model


def save_adapters(
    model: nn.Module, cfg: LoRAConfig, folder: str | Path, *, base: str, base_sha256: str | None
) -> Path:
    """Write adapter.safetensors and adapter.json (config, targets, base identity) to `folder`, atomically."""
    mods = _required(model)
    for n, m in mods.items():
        if (m.rank, m.alpha) != (cfg.rank, cfg.alpha):
            raise TrainError(f"{n}: rank {m.rank}, alpha {m.alpha}; the config says {cfg.rank}, {cfg.alpha}")
    out = Path(folder)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        tensors = {k: v.cpu().contiguous() for k, v in lora_state_dict(model).items()}
        save_file(tensors, str(tmp / WEIGHTS))
        meta = {"format": FORMAT, "version": VERSION, "config": {**asdict(cfg), "targets": list(cfg.targets)},
                "targets": list(mods), "base": base, "base_sha256": base_sha256}  # fmt: skip
        (tmp / META).write_text(json.dumps(meta, indent=1))
        os.chmod(tmp, 0o755)
        replace_dir(tmp, out, marker=META, what="a LoRA adapter folder", error=TrainError)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_adapters(model: nn.Module, folder: str | Path, *, base_sha256: str | None = None) -> LoRAConfig:
    """Load saved adapters into `model` (applying LoRA first if it has none); returns their config.

    Everything is checked before the model changes: a mismatched base (when `base_sha256` is given),
    target list, tensor name, shape or dtype is a TrainError and leaves the model as it was.
    """
    folder = Path(folder)
    meta_path, weights_path = folder / META, folder / WEIGHTS
    for p in (meta_path, weights_path):
        if not p.is_file():
            raise TrainError(f"{folder}: no {p.name} (not a LoRA adapter folder; see save_adapters)")
    cfg, targets, base, sha = _read_meta(meta_path)
    if base_sha256 is not None and sha != base_sha256:
        raise TrainError(
            f"{meta_path}: the adapters belong to base {base!r} (sha256 {sha or 'not recorded'}), "
            f"not to this one (sha256 {base_sha256})"
        )
    mods = adapters(model)
    if mods:
        if any(m.merged for m in mods.values()):
            raise TrainError("the model's adapters are merged; unmerge_lora before loading others")
        if any((m.rank, m.alpha) != (cfg.rank, cfg.alpha) for m in mods.values()):
            raise TrainError(
                f"{meta_path}: rank {cfg.rank}, alpha {cfg.alpha} differ from the model's adapters"
            )
        shapes = {n: (m.out_features, m.in_features) for n, m in mods.items()}
    else:
        shapes = {n: (m.out_features, m.in_features) for n, m in _find(model, cfg).items()}
    if set(shapes) != set(targets):
        odd = sorted(set(targets) ^ set(shapes))[0]
        side = "the adapters target" if odd in targets else "the model also has"
        raise TrainError(f"{meta_path}: {side} {odd!r}: trained for another architecture or target list")
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise TrainError(f"{weights_path}: not a readable safetensors file: {_short(e)}") from None
    expected = {}
    for n, (o, i) in shapes.items():
        expected[f"{n}.lora_A"], expected[f"{n}.lora_B"] = (cfg.rank, i), (o, cfg.rank)
    if missing := sorted(set(expected) - set(tensors)):
        raise TrainError(f"{weights_path}: missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    if unexpected := sorted(set(tensors) - set(expected)):
        raise TrainError(f"{weights_path}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all)")
    for k, shape in expected.items():
        t = tensors[k]
        if tuple(t.shape) != shape:
            raise TrainError(
                f"{weights_path}: tensor {k!r} has shape {tuple(t.shape)}, the model needs {shape}"
            )
        if not t.is_floating_point() or not torch.isfinite(t).all():
            raise TrainError(f"{weights_path}: tensor {k!r} is not finite floating point ({t.dtype})")
    if not mods:
        apply_lora(model, cfg)
        mods = adapters(model)
    with torch.no_grad():
        for n, m in mods.items():
            m.lora_A.copy_(tensors[f"{n}.lora_A"])
            m.lora_B.copy_(tensors[f"{n}.lora_B"])
    return cfg


def _find(model: nn.Module, cfg: LoRAConfig) -> dict[str, nn.Linear]:
    """The Linears `apply_lora` would wrap, checked: a plain model, at least one match, no tied weight."""
    if any(isinstance(m, (FusedBlock, FusedLinear)) for m in model.modules()):
        raise TrainError(
            "the model is the fused inference form; for LoRA load it with omni_model.load(source, fuse=False)"
        )
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    found = {n: m for n, m in linears.items() if _matches(n, cfg.targets)}
    if not found:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise TrainError(
            f"no Linear module matches the LoRA targets {list(cfg.targets)}; this model's Linears are named "
            f"{', '.join(leaves[:10]) or 'nothing'}{', ...' if len(leaves) > 10 else ''}"
        )
    owners: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(n)
    for n, m in found.items():
        if len(names := owners[id(m.weight)]) > 1:
            other = next(o for o in names if o != f"{n}.weight")
            raise TrainError(f"{n}: its weight is tied to {other!r}; merging an adapter would change both")
    return found


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    """`name` matches a pattern whole or from a dot on: "q_proj" and "self_attn.*" match inside a block."""
    return any(fnmatchcase(name, p) or fnmatchcase(name, "*." + p) for p in patterns)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, module)


def _required(model: nn.Module) -> dict[str, LoRALinear]:
    if not (mods := adapters(model)):
        raise TrainError("the model has no LoRA adapters (apply_lora or load_adapters first)")
    return mods


def _read_meta(path: Path) -> tuple[LoRAConfig, list[str], str, str | None]:
    """adapter.json's config, target names and base identity, every field's type checked."""
    if path.stat().st_size > MAX_META_BYTES:
        raise TrainError(
            f"{path}: {path.stat().st_size:,} bytes; an adapter.json holds at most {MAX_META_BYTES:,}"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise TrainError(f"{path}: not readable JSON: {_short(e)}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise TrainError(f"{path}: not an OmniCoder LoRA adapter file (format {FORMAT!r})")
    if meta.get("version") != VERSION:
        raise TrainError(
            f"{path}: adapter format version {meta.get('version')!r}; this build reads {VERSION}"
        )
    c, targets, base, sha = meta.get("config"), meta.get("targets"), meta.get("base"), meta.get("base_sha256")
    if not isinstance(c, dict):
        raise TrainError(f"{path}: 'config' must be a JSON object, got {_short(c)}")
    try:
        cfg = LoRAConfig(**{k: c.get(k) for k in ("rank", "alpha", "dropout", "targets")})
    except TrainError as e:
        raise TrainError(f"{path}: {e}") from None
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise TrainError(f"{path}: 'targets' must be a non-empty list of module names, got {_short(targets)}")
    if len(set(targets)) != len(targets):
        raise TrainError(f"{path}: 'targets' names a module twice")
    if not isinstance(base, str):
        raise TrainError(f"{path}: 'base' must be a string, got {_short(base)}")
    if sha is not None and not isinstance(sha, str):
        raise TrainError(f"{path}: 'base_sha256' must be a string or null, got {_short(sha)}")
    return cfg, targets, base, sha


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _finite(v: float) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:  # an int past float's range, as JSON can spell one
        return False


def _short(v: Any) -> str:
    return " ".join(str(v).split())[:120]
