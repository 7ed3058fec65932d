"""The build's stage cache: a stage runs again only when its inputs or its outputs changed.

Each finished stage leaves a record, `BUILD/stages/NAME.json`: the key (sha256 of the stage's name and
inputs, upstream stages' fingerprints among them), its result, and the size and sha256 of every file it
wrote. A record is trusted only when it parses, its key matches and every file still hashes the same;
anything else runs the stage again. Outputs are written under temporary names and renamed when
complete, and the record is written (also atomically) after them, so a build killed at any point
leaves either a finished, recorded stage or nothing a later run trusts. Leftover temporary folders
are removed when the next build starts.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omni_model.errors import OmniError
from omni_model.files import file_sha256, read_json, write_text_atomic

RECORDS = "stages"
RECORD_FORMAT = "omnicoder-build-stage"


class BuildError(OmniError):
    """The build cannot go on: bad input, a failed check, a stage that failed."""


@dataclass(frozen=True)
class Event:
    """What the pipeline tells its caller: a stage starts, reports progress, is reused, finishes, fails."""

    stage: str
    state: str  # start | progress | cached | done | failed
    detail: str = ""
    done: int = 0
    total: int = 0
    seconds: float = 0.0


OnEvent = Callable[[Event], None]
Progress = Callable[[str, int, int], None]


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _files(root: Path, outputs: Iterable[str]) -> list[str]:
    found: list[str] = []
    for out in outputs:
        p = root / out
        if p.is_file():
            found.append(out)
        elif p.is_dir():
            found += sorted(str(f.relative_to(root)) for f in p.rglob("*") if f.is_file())
    return found


def remove_leftovers(root: Path) -> list[str]:
    """Delete temporary files and folders an interrupted build left (`.NAME.*.tmp`, `.NAME.old-PID`)."""
    gone = []
    for folder in (root, root / RECORDS):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if p.name.startswith(".") and (p.name.endswith(".tmp") or ".old-" in p.name):
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
                gone.append(str(p.relative_to(root)))
    return gone


class Store:
    """Runs stages under `root`, reusing those whose record is still true (unless `force`). With
    `dry_run` nothing runs: `run` only says whether the stage would be reused."""

    def __init__(self, root: Path, *, force: bool = False, dry_run: bool = False,
                 on_event: OnEvent | None = None) -> None:  # fmt: skip
        self.root, self.force, self.dry_run = root, force, dry_run
        self.emit = on_event or (lambda event: None)
        self.status: dict[str, dict[str, Any]] = {}
        self._fingerprints: dict[str, str | None] = {}

    def _record_path(self, name: str) -> Path:
        return self.root / RECORDS / f"{name}.json"

    def _trusted(self, name: str, key: str) -> dict[str, Any] | None:
        path = self._record_path(name)
        if self.force or not path.is_file():
            return None
        try:
            rec = read_json(path, BuildError)
        except BuildError:
            return None
        if not isinstance(rec, dict) or rec.get("format") != RECORD_FORMAT or rec.get("key") != key:
            return None
        files = rec.get("files")
        if not isinstance(files, dict):
            return None
        for rel, want in files.items():
            p = self.root / rel
            if not isinstance(want, dict) or not p.is_file() or p.stat().st_size != want.get("bytes"):
                return None
            if file_sha256(p) != want.get("sha256"):
                return None
        return rec

    def fingerprint(self, name: str) -> str | None:
        """What downstream stages key on: the stage's key and its files' hashes (None: not built yet)."""
        return self._fingerprints.get(name)

    def run(self, name: str, inputs: dict[str, Any], make: Callable[[Progress], dict[str, Any]],
            outputs: tuple[str, ...] = ()) -> dict[str, Any] | None:  # fmt: skip
        """The stage's result: from its record when trusted, else from `make(progress)`, whose files are
        the paths `outputs` under the root. In a dry run, None when the stage would run."""
        key = digest({"stage": name, "inputs": inputs})
        upstream_missing = any(v is None for v in inputs.values())
        rec = None if upstream_missing else self._trusted(name, key)
        if rec is not None:
            self._fingerprints[name] = digest([key, rec["files"]])
            self.status[name] = {
                "status": "cached",
                "seconds": rec["seconds"],
                "reused_seconds": rec["seconds"],
            }
            self.emit(Event(name, "cached", seconds=rec["seconds"]))
            return rec["result"]
        if self.dry_run:
            self._fingerprints[name] = None
            self.status[name] = {"status": "to run"}
            return None
        self._record_path(name).unlink(missing_ok=True)  # from here until the new record, nothing is trusted
        self.emit(Event(name, "start"))
        t0 = time.perf_counter()
        try:
            result = make(lambda what, done, total: self.emit(Event(name, "progress", what, done, total)))
        except BaseException:
            self.emit(Event(name, "failed", seconds=time.perf_counter() - t0))
            raise
        seconds = time.perf_counter() - t0
        files = {rel: {"bytes": (self.root / rel).stat().st_size, "sha256": file_sha256(self.root / rel)}
                 for rel in _files(self.root, outputs)}  # fmt: skip
        record = {"format": RECORD_FORMAT, "stage": name, "key": key, "inputs": inputs, "result": result,
                  "files": files, "seconds": round(seconds, 3),
                  "created": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}  # fmt: skip
        write_text_atomic(self._record_path(name), json.dumps(record, indent=1, default=str))
        self._fingerprints[name] = digest([key, files])
        self.status[name] = {"status": "built", "seconds": round(seconds, 3)}
        self.emit(Event(name, "done", seconds=seconds))
        return result
