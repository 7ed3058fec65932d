"""Sharded faiss indices on disk, searched under a resident-memory budget.

`build_index(vectors, out)` trains one quantizer (Flat, PQ or IVF-PQ; sizes chosen from a byte
target when not given), adds the vectors shard by shard and writes each shard as its own faiss file,
plus `index.json` (what was built) and `budget.json` (bytes per vector, shard sizes, the resident
bytes a budget implies). The folder is written under a temporary name and renamed when complete:
an interrupted build leaves nothing that looks like an index.

`ShardedIndex.open(folder, budget_bytes)` maps shards in on demand (faiss's memory-mapped reading,
flat codes included) and keeps at most `budget_bytes` of them open, closing the least recently used
first; a search visits every shard and merges the per-shard top k. Vectors are compared by inner
product (normalise them for cosine similarity) or by L2 distance; scores are "higher is closer" either
way (L2: the negated squared distance).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import faiss
import numpy as np

from omni_model.files import replace_dir
from omni_retrieval.errors import RetrievalError

Kind = Literal["auto", "flat", "pq", "ivfpq"]
MANIFEST, BUDGET, FORMAT, VERSION = "index.json", "budget.json", "omnicoder-index", 1
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class IndexConfig:
    kind: Kind = "auto"
    metric: Literal["ip", "l2"] = "ip"
    bytes_per_vector: int | None = None  # PQ code size (bytes = sub-quantizers of 8 bits); None: from target
    target_bytes: int | None = None  # the whole index; auto picks the kind and code size to fit it
    nlist: int | None = None  # IVF lists; None: about 4 sqrt(n)
    nprobe: int = 16  # IVF lists visited per query
    shard_vectors: int = 65536
    train_vectors: int = 65536  # the sample the quantizer learns from

    def __post_init__(self) -> None:
        if self.kind not in ("auto", "flat", "pq", "ivfpq"):
            raise RetrievalError(f"index kind must be auto, flat, pq or ivfpq, got {self.kind!r}")
        if self.metric not in ("ip", "l2"):
            raise RetrievalError(f"index metric must be ip or l2, got {self.metric!r}")
        for name in ("bytes_per_vector", "target_bytes", "nlist"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise RetrievalError(f"{name} must be positive, got {v}")
        if self.nprobe < 1 or self.shard_vectors < 1 or self.train_vectors < 1:
            raise RetrievalError("nprobe, shard_vectors and train_vectors must be positive")


@dataclass(frozen=True)
class Plan:
    kind: str
    m: int  # PQ sub-quantizers (bytes per code); 0 for flat
    nlist: int  # 0 unless IVF

    def factory(self, dim: int) -> str:
        return {"flat": "Flat", "pq": f"PQ{self.m}", "ivfpq": f"IVF{self.nlist},PQ{self.m}"}[self.kind]

    def code_bytes(self, dim: int) -> int:
        return 4 * dim if self.kind == "flat" else self.m


def plan(dim: int, n: int, config: IndexConfig) -> Plan:
    """The kind and sizes for n vectors of `dim`: PQ code bytes from bytes_per_vector or target_bytes
    (the largest divisor of dim that fits), IVF once there are enough vectors to train its lists."""
    kind = config.kind
    budget = config.bytes_per_vector
    if budget is None and config.target_bytes is not None:
        budget = config.target_bytes // max(n, 1)
    if kind == "auto":
        kind = "flat" if budget is None or budget >= 4 * dim else ("ivfpq" if n >= 10_000 else "pq")
    if kind == "flat":
        return Plan("flat", 0, 0)
    if budget is None:
        budget = max(1, dim // 8)  # 32x smaller than float32 by default
    divisors = [m for m in range(1, dim + 1) if dim % m == 0 and m <= budget]
    if not divisors:
        raise RetrievalError(f"no PQ code fits {budget} bytes per vector")
    m = max(divisors)
    nlist = 0
    if kind == "ivfpq":
        nlist = config.nlist or max(1, min(int(4 * math.sqrt(n)), n // 39))
        if n < 39 * nlist:
            raise RetrievalError(
                f"IVF with {nlist} lists needs at least {39 * nlist} vectors to train; got {n}"
            )
    if n < 256:  # 8-bit PQ learns 256 centroids per sub-quantizer
        raise RetrievalError(f"a PQ index needs at least 256 vectors to train; got {n}")
    return Plan(kind, m, nlist)


def _check_vectors(vectors: np.ndarray, what: str) -> np.ndarray:
    if (
        not isinstance(vectors, np.ndarray)
        or vectors.ndim != 2
        or vectors.shape[0] == 0
        or vectors.shape[1] == 0
    ):
        raise RetrievalError(
            f"{what}: expected a non-empty (n, dim) array, got shape {getattr(vectors, 'shape', None)}"
        )
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    if not np.isfinite(v).all():
        raise RetrievalError(f"{what}: holds non-finite values")
    return v


def build_index(
    vectors: np.ndarray, out: str | Path, config: IndexConfig | None = None, *, meta: dict | None = None,
    on_progress: Progress | None = None, extra: Callable[[Path], None] | None = None,
) -> dict:  # fmt: skip
    """Write the index of `vectors` (n, dim) to the folder `out`; returns its manifest. `meta` (JSON)
    is stored in the manifest (what the vectors are: the embedding model, the chunks file, ...);
    `extra(folder)` writes more files into the folder before it is put in place."""
    config = config or IndexConfig()
    report = on_progress or (lambda what, done, total: None)
    x = _check_vectors(vectors, "vectors")
    n, dim = x.shape
    p = plan(dim, n, config)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        report("training", 0, 1)
        metric = faiss.METRIC_INNER_PRODUCT if config.metric == "ip" else faiss.METRIC_L2
        base = faiss.index_factory(dim, p.factory(dim), metric)
        if not base.is_trained:
            rng = np.random.default_rng(0)
            sample = x if n <= config.train_vectors else x[rng.choice(n, config.train_vectors, replace=False)]
            pq = getattr(base, "pq", None) or getattr(faiss.try_extract_index_ivf(base), "pq", None)
            if (
                pq is not None
            ):  # fewer than faiss's 39 points per centroid is the data's size: no warning print
                pq.cp.min_points_per_centroid = min(39, len(sample) // 256)
            base.train(sample)
        shards = []
        n_shards = -(-n // config.shard_vectors)
        for s in range(n_shards):
            report("adding vectors", s, n_shards)
            lo, hi = s * config.shard_vectors, min(n, (s + 1) * config.shard_vectors)
            index = faiss.clone_index(base)
            index.add(x[lo:hi])
            name = f"shard-{s:05d}.faiss"
            faiss.write_index(index, str(tmp / name))
            shards.append({"file": name, "start": lo, "count": hi - lo, "bytes": (tmp / name).stat().st_size})
        manifest = {"format": FORMAT, "version": VERSION, "dim": dim, "count": n, "kind": p.kind,
                    "factory": p.factory(dim), "code_bytes": p.code_bytes(dim), "nlist": p.nlist,
                    "nprobe": config.nprobe, "metric": config.metric, "shards": shards,
                    "config": asdict(config), "meta": meta or {}}  # fmt: skip
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        (tmp / BUDGET).write_text(json.dumps(budget_profile(manifest), indent=1))
        if extra is not None:
            extra(tmp)
        report("writing", n_shards, n_shards)
        os.chmod(tmp, 0o755)
        replace_dir(tmp, out, marker=MANIFEST, what="an index", error=RetrievalError)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def load_vectors(path: str | Path) -> np.ndarray:
    """A (n, dim) float array from a .npy file (never unpickled)."""
    path = Path(path)
    try:
        v = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise RetrievalError(f"{path}: not a readable .npy array: {' '.join(str(e).split())[:160]}") from None
    if v.ndim != 2 or v.dtype.kind != "f":
        raise RetrievalError(f"{path}: expected a 2-D float array (n, dim), got {v.dtype} {v.shape}")
    return v


def budget_profile(manifest: dict, budget_bytes: int | None = None) -> dict:
    sizes = [s["bytes"] for s in manifest["shards"]]
    total = sum(sizes)
    out = {"bytes_per_vector": total / max(manifest["count"], 1), "code_bytes": manifest["code_bytes"],
           "float32_bytes_per_vector": 4 * manifest["dim"], "compression": 4 * manifest["dim"] / manifest["code_bytes"],
           "shard_bytes": sizes, "index_bytes": total, "largest_shard_bytes": max(sizes)}  # fmt: skip
    if budget_bytes is not None:
        out["budget_bytes"] = budget_bytes
        out["expected_resident_bytes"] = min(total, budget_bytes)
    return out


def read_manifest(folder: str | Path) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise RetrievalError(f"{folder}: no {MANIFEST} (not an index; see press-play index build)")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise RetrievalError(f"{path}: not readable JSON: {' '.join(str(e).split())[:160]}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("version") != VERSION:
        raise RetrievalError(f"{path}: not an OmniCoder index manifest (format {FORMAT!r} version {VERSION})")
    try:
        dim, count, shards = m["dim"], m["count"], m["shards"]
        if not (isinstance(dim, int) and 0 < dim < 1 << 16 and isinstance(count, int) and count >= 0):
            raise RetrievalError(f"{path}: dim and count must be positive integers")
        if m.get("metric") not in ("ip", "l2"):
            raise RetrievalError(f"{path}: metric must be ip or l2, got {m.get('metric')!r}")
        start = 0
        for s in shards:
            f = s["file"]
            if not isinstance(f, str) or "/" in f or "\\" in f or f.startswith("."):
                raise RetrievalError(f"{path}: shard file {f!r} is not a plain name inside the folder")
            if s["start"] != start or not isinstance(s["count"], int) or s["count"] <= 0:
                raise RetrievalError(f"{path}: shard {f} does not continue the ids at {start}")
            start += s["count"]
            if not (folder / f).is_file():
                raise RetrievalError(f"{folder / f}: missing (named by {MANIFEST})")
            if (folder / f).stat().st_size != s["bytes"]:
                raise RetrievalError(f"{folder / f}: {(folder / f).stat().st_size} bytes, the manifest says {s['bytes']} (truncated or replaced)")  # fmt: skip
        if start != count:
            raise RetrievalError(f"{path}: shards hold {start} vectors, the manifest says {count}")
    except (KeyError, TypeError) as e:
        raise RetrievalError(f"{path}: lacks the field {e}") from None
    return m


@dataclass(frozen=True)
class SearchStats:
    shard_loads: int  # shards mapped in (first use or after eviction)
    evictions: int
    open_bytes: int  # file bytes of the shards open now
    peak_open_bytes: int


class ShardedIndex:
    """An index folder searched with at most `budget_bytes` of shards open at once (None: no limit)."""

    def __init__(
        self, folder: str | Path, budget_bytes: int | None = None, nprobe: int | None = None
    ) -> None:
        self.folder = Path(folder)
        self.manifest = m = read_manifest(self.folder)
        self.dim, self.count = m["dim"], m["count"]
        largest = max((s["bytes"] for s in m["shards"]), default=0)
        if budget_bytes is not None and budget_bytes < largest:
            raise RetrievalError(
                f"a budget of {budget_bytes} bytes is smaller than one shard ({largest} bytes)"
            )
        self.budget_bytes, self.nprobe = budget_bytes, nprobe or m["nprobe"]
        self._open: OrderedDict[int, faiss.Index] = OrderedDict()
        self._bytes = 0
        self._loads = self._evictions = self._peak = 0

    @classmethod
    def open(
        cls, folder: str | Path, budget_bytes: int | None = None, nprobe: int | None = None
    ) -> ShardedIndex:
        return cls(folder, budget_bytes, nprobe)

    def _shard(self, i: int) -> faiss.Index:
        if i in self._open:
            self._open.move_to_end(i)
            return self._open[i]
        size = self.manifest["shards"][i]["bytes"]
        while self._open and self.budget_bytes is not None and self._bytes + size > self.budget_bytes:
            j, _ = self._open.popitem(last=False)
            self._bytes -= self.manifest["shards"][j]["bytes"]
            self._evictions += 1
        path = self.folder / self.manifest["shards"][i]["file"]
        try:
            # IVF lists and flat/PQ codes each have their own memory-mapped reading in faiss.
            flag = faiss.IO_FLAG_MMAP if self.manifest["kind"] == "ivfpq" else faiss.IO_FLAG_MMAP_IFC
            index = faiss.read_index(str(path), flag)
        except RuntimeError as e:
            raise RetrievalError(f"{path}: faiss cannot read it: {' '.join(str(e).split())[:160]}") from None
        if index.d != self.dim or index.ntotal != self.manifest["shards"][i]["count"]:
            raise RetrievalError(
                f"{path}: holds {index.ntotal} vectors of dim {index.d}; the manifest says otherwise"
            )
        if hasattr(index, "nprobe"):
            index.nprobe = self.nprobe
        else:
            ivf = faiss.try_extract_index_ivf(index)
            if ivf is not None:
                ivf.nprobe = self.nprobe
        self._open[i] = index
        self._bytes += size
        self._loads += 1
        self._peak = max(self._peak, self._bytes)
        return index

    def search(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Scores and ids (q, k) of the k best vectors for each query (ids -1 where fewer exist)."""
        q = _check_vectors(queries, "queries")
        if q.shape[1] != self.dim:
            raise RetrievalError(f"queries have dim {q.shape[1]}; the index holds vectors of dim {self.dim}")
        if k < 1:
            raise RetrievalError(f"k must be >= 1, got {k}")
        scores = np.full((q.shape[0], 0), -np.inf, np.float32)
        ids = np.zeros((q.shape[0], 0), np.int64)
        order = list(self._open) + [i for i in range(len(self.manifest["shards"])) if i not in self._open]
        for i in order:  # open shards first: no load wasted on a shard about to be evicted
            d, j = self._shard(i).search(q, k)
            if self.manifest["metric"] == "l2":
                d = -d  # higher is closer, as for inner product
            d = np.where(j >= 0, d, -np.inf)
            j = np.where(j >= 0, j + self.manifest["shards"][i]["start"], -1)
            scores, ids = np.concatenate([scores, d], axis=1), np.concatenate([ids, j], axis=1)
            top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            scores, ids = np.take_along_axis(scores, top, 1), np.take_along_axis(ids, top, 1)
        return scores, ids

    @property
    def stats(self) -> SearchStats:
        return SearchStats(self._loads, self._evictions, self._bytes, self._peak)

    def close(self) -> None:
        self._open.clear()
        self._bytes = 0
