"""Build profiles: what `press-play build` makes of a model, as TOML data files with a schema.

A profile names the memory budget, the context the KV cache holds, the ONNX graph's cache format, the
speculative proposer to benchmark, and one table per output format (`[onnx]` always; `[executorch]` and
`[coreml]` when present), plus the validation thresholds and benchmark rounds. `load_profile` takes a
name from `profiles/` (mobile-2gb, mobile-4gb, desktop) or a path to a .toml file; an unknown key, a
missing one or a wrong type is a ProfileError naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from omni_model.errors import OmniError

DEFAULT_PROFILE = "mobile-2gb"
FORMATS = ("onnx", "executorch", "coreml")
# What each format's export takes (omni_export.ExportConfig, ExecuTorchConfig, CoreMLConfig).
WEIGHTS = {"onnx": ("float32", "float16", "int8", "int4"), "executorch": ("float32", "int4"),
           "coreml": ("int4", "float16", "float32")}  # fmt: skip
QUANTIZED = ("int4", "int8")


class ProfileError(OmniError):
    """A profile that cannot be found or does not follow the schema."""


@dataclass(frozen=True)
class FormatSpec:
    weights: str
    block_size: int = 32  # 4/8-bit blocks along K (ONNX: 16..256; ExecuTorch: the int4 group)


@dataclass(frozen=True)
class Validation:
    greedy_tokens: int = 32  # float formats: greedy tokens that must equal PyTorch's
    ppl_tokens: int = 4096  # quantized formats: perplexity over this many tokens of Hamlet
    ppl_context: int = 512  # in non-overlapping windows of this many
    ppl_tolerance: float = 0.01  # |ppl / ppl(PyTorch float32) - 1| at most this
    logits_tolerance: float = 1e-3  # float32 formats: max |logits diff| measured at export


@dataclass(frozen=True)
class Bench:
    rounds: int = 3  # fresh processes per engine; medians are reported
    short_tokens: int = 16  # decode after a short prompt ...
    prompt_tokens: int = 512  # ... and after a long one, whose prefill is timed
    decode_tokens: int = 128
    llama_cpp: bool = True  # llama.cpp on a GGUF source, when the benchmark-only peer environment exists


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    budget: str  # "2GB", "1536MiB", ...
    context: int
    onnx: FormatSpec
    kv: str = "float32"
    speculative: str = "none"  # none | lookup
    executorch: FormatSpec | None = None
    coreml: FormatSpec | None = None
    validate: Validation = field(default_factory=Validation)
    bench: Bench = field(default_factory=Bench)
    path: str = ""  # the file it was read from

    @property
    def budget_bytes(self) -> int:
        from omni_kv.spec import parse_size

        return parse_size(self.budget, "budget")

    @property
    def formats(self) -> dict[str, FormatSpec]:
        """The formats to build, in build order."""
        return {f: spec for f in FORMATS if (spec := getattr(self, f)) is not None}

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def profile_dirs() -> list[Path]:
    """Where profile names are looked up: the wheel's copy, then the checkout's `profiles/`."""
    here = Path(__file__).resolve()
    return [here.parent / "profiles", here.parents[4] / "profiles"]


def available_profiles() -> list[str]:
    return sorted({p.stem for d in profile_dirs() if d.is_dir() for p in d.glob("*.toml")})


def find_profile(name: str) -> Path:
    path = Path(name)
    if path.suffix == ".toml" or path.is_file():
        if not path.is_file():
            raise ProfileError(f"profile {name}: no such file")
        return path
    for d in profile_dirs():
        if (d / f"{name}.toml").is_file():
            return d / f"{name}.toml"
    raise ProfileError(
        f"unknown profile {name!r} (profiles: {', '.join(available_profiles()) or 'none found'})"
    )


def load_profile(name: str) -> Profile:
    """The profile `name` (a name from profiles/ or a .toml path), checked against the schema."""
    path = find_profile(name)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ProfileError(f"{path}: cannot read it: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"{path}: not valid TOML: {e}") from None
    profile = _build(Profile, {"name": path.stem, "path": str(path), **data}, path, "")
    _check(profile, path)
    return profile


def _build(cls: type, data: dict[str, Any], path: Path, prefix: str) -> Any:
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise ProfileError(
                f"{path}: unknown key {prefix}{key} (keys: {', '.join(k for k in fields if k not in ('name', 'path'))})"
            )
    values: dict[str, Any] = {}
    for name, f in fields.items():
        key = f"{prefix}{name}"
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ProfileError(f"{path}: missing key {key}")
            continue
        value, hint = data[name], hints[name]
        nested = next(
            (t for t in (FormatSpec, Validation, Bench) if t in getattr(hint, "__args__", (hint,))), None
        )
        if nested is not None:
            if not isinstance(value, dict):
                raise ProfileError(f"{path}: {key} must be a table ([{key}])")
            values[name] = _build(nested, value, path, f"{key}.")
            continue
        want = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[hint]
        ok = isinstance(value, hint) and not (hint is int and isinstance(value, bool))
        if hint is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise ProfileError(f"{path}: {key} must be {want}, got {value!r}")
        values[name] = value
    return cls(**values)


def _check(p: Profile, path: Path) -> None:
    def bad(key: str, why: str) -> ProfileError:
        return ProfileError(f"{path}: {key} {why}")

    try:
        if p.budget_bytes <= 0:
            raise ValueError
    except Exception:
        raise bad("budget", f"{p.budget!r} is not a size (examples: 2GB, 1536MiB)") from None
    if p.context < 2:
        raise bad("context", f"must be at least 2, got {p.context}")
    if p.kv not in ("float32", "int8"):
        raise bad("kv", f"must be float32 or int8, got {p.kv!r}")
    if p.speculative not in ("none", "lookup"):
        raise bad("speculative", f"must be none or lookup, got {p.speculative!r}")
    for fmt, spec in p.formats.items():
        if spec.weights not in WEIGHTS[fmt]:
            raise bad(f"{fmt}.weights", f"must be one of {', '.join(WEIGHTS[fmt])}, got {spec.weights!r}")
        if spec.block_size not in (16, 32, 64, 128, 256):
            raise bad(f"{fmt}.block_size", f"must be 16, 32, 64, 128 or 256, got {spec.block_size}")
    v, b = p.validate, p.bench
    if v.greedy_tokens < 1 or v.ppl_tokens < 2 or v.ppl_context < 2:
        raise bad("validate", "greedy_tokens must be >= 1, ppl_tokens and ppl_context >= 2")
    if not 0 < v.ppl_tolerance < 1 or v.logits_tolerance <= 0:
        raise bad("validate", "ppl_tolerance must lie in (0, 1) and logits_tolerance be positive")
    if b.rounds < 1 or b.short_tokens < 1 or b.prompt_tokens < 1 or b.decode_tokens < 2:
        raise bad("bench", "rounds, short_tokens and prompt_tokens must be >= 1, decode_tokens >= 2")
