"""Putting a finished folder in place: the last step of every atomic folder write (exports, indices)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def replace_dir(tmp: Path, out: Path, *, marker: str, what: str, error: type[Exception]) -> None:
    """Move the complete folder `tmp` to `out`. An existing `out` is replaced only when it holds
    `marker` (it is one of ours: `what`, e.g. "an index") and only once `tmp` is complete; any other
    folder there is left alone and `error` raised."""
    if out.exists():
        if not (out / marker).is_file():
            raise error(f"{out}: exists and is not {what} (no {marker}); not overwriting it")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
