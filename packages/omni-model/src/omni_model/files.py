"""Putting a finished folder in place: the last step of every atomic folder write (exports, indices);
and keeping native libraries' own prints off the terminal."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


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


@contextmanager
def writing_dir(out: Path, *, marker: str, what: str, error: type[Exception]) -> Iterator[Path]:
    """A temporary folder beside `out` to write the new one into. When the block ends cleanly it is
    made readable by all (mkdtemp's 0700 is for the temporary name only) and put in place by
    `replace_dir`; when it raises, the temporary folder is removed and `out` is untouched."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o755 if f.is_dir() else 0o644)
        replace_dir(tmp, out, marker=marker, what=what, error=error)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null while the block runs: for native libraries that log to it
    directly (ExecuTorch's CPU probing when its thread pool starts), which a library must not let
    through. Their failures still arrive as exceptions."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def read_json(path: Path, error: type[Exception]) -> Any:
    """The JSON document at `path` (untrusted: a manifest, a sidecar); `error` with one line naming the
    file when it cannot be read or parsed."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise error(f"{path}: not readable JSON: {' '.join(str(e).split())[:200]}") from None


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 4 MiB pieces."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def writing_file(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary name beside `path` for the block to write; renamed onto `path` (mode 0644) when the
    block ends cleanly, removed when it raises. `suffix` keeps a format's extension for writers that
    choose by it (Pillow, FFmpeg)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path: Path, text: str) -> None:
    """Write `path` under a temporary name in its folder, then rename it into place (the file keeps the
    old one's mode, or a plain file's)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
