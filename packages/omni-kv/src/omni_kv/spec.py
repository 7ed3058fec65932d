"""`CacheSpec`: which cache a model builds, as typed configuration (profiles, the CLI's `--kv`).

Kinds: `dense` (float32 or float16), `int8` (per token), `kivi` (int4 or int8 in KIVI's layout:
keys per channel, values per token, groups of `group`, the newest `residual` tokens in full
precision), `nf4`, `sink` (StreamingLLM: `sinks` first tokens + the last `window`) and `window` (the
last `window` only, no sinks: what sinks fix). The text form is the kind with optional settings:
"kivi", "kivi:bits=2,group=32,residual=128", "sink:sinks=4,window=1024", "dense:dtype=float16".

The planner answers the two questions of a memory budget: how many bytes a context of n tokens takes
(`kv_bytes`) and the longest context a budget holds (`max_context`).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Literal

from omni_kv.protocol import KVCacheError
from omni_kv.quantized import KVQuantConfig, bytes_per_token

Kind = Literal["dense", "int8", "kivi", "nf4", "sink", "window", "paged"]
KINDS = ("dense", "int8", "kivi", "nf4", "sink", "window", "paged")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str, what: str) -> int:
    """'16MiB', '2GB', '4096': bytes; a one-line error otherwise."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).upper() if m else ""
    if not m or unit not in _UNITS or float(m.group(1)) <= 0:
        raise KVCacheError(f"{what} {text!r}: not a positive size (examples: 16MiB, 2GB, 4096)")
    return int(float(m.group(1)) * _UNITS[unit])


@dataclass(frozen=True)
class CacheSpec:
    kind: Kind = "dense"
    dtype: Literal["float32", "float16"] = "float32"  # dense, sink and window caches
    bits: int = 4  # kivi
    group: int | None = None  # kivi: 32, nf4: 64
    residual: int | None = None  # kivi and nf4: 128, int8: 0
    sinks: int = 4  # sink
    window: int = 1024  # sink and window
    calibration: str | None = None  # int8 and nf4: a KV calibration sidecar (press-play kv calibrate)
    budget_bytes: int = 64 * 2**20  # paged: resident pages
    page_tokens: int = 64  # paged
    spill_dir: str | None = None  # paged: where the spill file goes (None: a temporary directory)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise KVCacheError(f"KV cache kind must be one of {', '.join(KINDS)}; got {self.kind!r}")
        if self.dtype not in ("float32", "float16"):
            raise KVCacheError(f"KV cache dtype must be float32 or float16, got {self.dtype!r}")
        if self.kind == "kivi" and self.bits not in (4, 8):
            raise KVCacheError(f"KIVI bits must be 4 or 8, got {self.bits}")
        if self.kind == "paged" and (self.page_tokens < 1 or self.budget_bytes < 1):
            raise KVCacheError(f"paged cache: page_tokens and budget_bytes must be positive, got "
                               f"{self.page_tokens} and {self.budget_bytes}")  # fmt: skip
        if self.window < 1 or self.sinks < 0:
            raise KVCacheError(
                f"window must be >= 1 and sinks >= 0, got window={self.window}, sinks={self.sinks}"
            )
        if self.kind in ("int8", "kivi", "nf4"):
            self.quant_config()  # validates group and residual
        if self.calibration is not None and self.kind not in ("int8", "nf4"):
            raise KVCacheError(
                f"a KV calibration applies to int8 and nf4 caches (keys coded per token), not {self.kind}"
            )

    def load_calibration(self):
        """The sidecar this spec names, read and checked, or None."""
        if self.calibration is None:
            return None
        from omni_kv.calibration import KVCalibration

        return KVCalibration.load(self.calibration)

    @classmethod
    def parse(cls, text: str) -> CacheSpec:
        """'kind' or 'kind:key=value,...' (see the module docstring)."""
        kind, _, rest = text.strip().partition(":")
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        values: dict[str, object] = {"kind": kind}
        for item in filter(None, (p.strip() for p in rest.split(","))):
            key, eq, value = item.partition("=")
            if not eq or key not in fields or key == "kind":
                raise KVCacheError(f"KV cache setting {item!r} in {text!r}: expected key=value with key one of "
                                   f"{', '.join(k for k in fields if k != 'kind')}")  # fmt: skip
            if key in ("dtype", "calibration", "spill_dir"):
                values[key] = value
            elif key == "budget_bytes":
                values[key] = parse_size(value, f"KV cache setting {key} in {text!r}:")
            else:
                try:
                    values[key] = int(value)
                except ValueError:
                    raise KVCacheError(
                        f"KV cache setting {key}={value!r} in {text!r}: not an integer"
                    ) from None
        return cls(**values)  # type: ignore[arg-type]

    def quant_config(self) -> KVQuantConfig:
        if self.kind == "int8":
            return KVQuantConfig.int8(residual=self.residual or 0)
        if self.kind == "kivi":
            return KVQuantConfig.kivi(
                self.bits,
                32 if self.group is None else self.group,
                128 if self.residual is None else self.residual,
            )
        if self.kind == "nf4":
            return KVQuantConfig.nf4(
                64 if self.group is None else self.group, 128 if self.residual is None else self.residual
            )
        raise KVCacheError(f"a {self.kind} cache is not quantized")

    @property
    def bounded(self) -> bool:
        """Its memory stops growing: sink and window caches drop tokens, a paged one spills them."""
        return self.kind in ("sink", "window", "paged")

    def bytes_per_token(
        self, n_layers: int, n_kv_heads: int, head_dim: int, v_head_dim: int | None = None
    ) -> float:
        """Bytes one cached token takes over all layers (quantized: codes, scales and offsets)."""
        if self.kind in ("int8", "kivi", "nf4"):
            return bytes_per_token(self.quant_config(), n_layers, n_kv_heads, head_dim, v_head_dim)
        width = 2 if self.dtype == "float16" else 4
        return n_layers * n_kv_heads * (head_dim + (v_head_dim or head_dim)) * width

    def kv_bytes(self, context: int, n_layers: int, n_kv_heads: int, head_dim: int,
                 v_head_dim: int | None = None) -> int:  # fmt: skip
        """Bytes the cache holds at `context` tokens: quantized tokens coded, the residual in float32,
        sink and window caches capped at what they keep."""
        per = self.bytes_per_token(n_layers, n_kv_heads, head_dim, v_head_dim)
        if self.kind == "paged":  # resident bytes; the rest is on disk
            return int(min(per * context, self.budget_bytes))
        if self.bounded:
            return int(per * min(context, self.window + (self.sinks if self.kind == "sink" else 0)))
        if self.kind in ("int8", "kivi", "nf4"):
            r = min(context, self.quant_config().keys.residual)
            full = n_layers * n_kv_heads * (head_dim + (v_head_dim or head_dim)) * 4
            return int(per * (context - r) + full * r)
        return int(per * context)

    def max_context(self, budget_bytes: int, n_layers: int, n_kv_heads: int, head_dim: int,
                    v_head_dim: int | None = None, limit: int = 1 << 24) -> int:  # fmt: skip
        """The longest context (<= limit) whose cache fits `budget_bytes`; a one-line error when not
        even one token does."""
        dims = (n_layers, n_kv_heads, head_dim, v_head_dim)
        if self.kv_bytes(1, *dims) > budget_bytes:
            raise KVCacheError(
                f"a KV budget of {budget_bytes} bytes is smaller than one token's cache ({self.kv_bytes(1, *dims)} bytes)"
            )
        lo, hi = 1, limit
        if self.kv_bytes(hi, *dims) <= budget_bytes:
            return hi
        while lo < hi - 1:  # kv_bytes grows with the context: bisect
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.kv_bytes(mid, *dims) <= budget_bytes else (lo, mid)
        return lo
