"""Reading config.json fields: each bad value is a ConfigError naming the field and what it holds."""

from __future__ import annotations

import math
from typing import Any

from omni_model.errors import ConfigError

REQUIRED = object()
MAX_LISTED_LAYERS = 2**16  # far beyond any real checkpoint


def positive(hf: dict[str, Any], key: str, kind: type = int, default: Any = REQUIRED) -> Any:
    """hf[key] as a positive int (or finite float); None passes when it is the default."""
    value = hf.get(key, default)
    if value is REQUIRED:
        raise ConfigError(f"config.json lacks the field {key!r}")
    if value is None and default is None:
        return None
    ok = not isinstance(value, bool) and isinstance(value, int if kind is int else int | float)
    if ok and kind is float:
        try:
            ok = math.isfinite(float(value))
        except OverflowError:  # an int beyond float range
            ok = False
    if not ok or not value > 0:
        what = "integer" if kind is int else "finite number"
        raise ConfigError(f"{key} must be a positive {what}, got {short(value)}")
    return kind(value)


def short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
