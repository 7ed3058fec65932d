"""Sharded faiss indices on disk, searched under a resident-memory budget.

Every kind is a faiss IVF index: IVF-PQ as such, PQ as IVF with one list (every code is scanned),
Flat as one list of raw vectors. `build_index(vectors, out)` trains it once (sizes chosen from a byte
target when not given) and writes the trained, empty index as `head.faiss` (coarse centroids, PQ
codebooks) and the vectors, shard by shard, as faiss inverted lists of their own (`shard-*.ivl`:
codes and ids), plus `index.json` (what was built) and `budget.json` (bytes per vector, shard sizes,
the resident bytes a budget implies). Nothing trained is stored twice. The folder is written under a
temporary name and renamed when complete: an interrupted build leaves nothing that looks like an
index.

`ShardedIndex(folder, budget_bytes)` keeps the head in memory and reads shards in on demand, keeping
at most `budget_bytes` of them loaded and dropping the least recently used first; a search runs the
head over each shard's lists in turn and merges the per-shard top k. Vectors are compared by inner
product (normalise them for cosine similarity) or by L2 distance; scores are "higher is closer" either
way (L2: the negated squared distance).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import faiss
import numpy as np

from omni_model.files import replace_dir
from omni_retrieval.errors import RetrievalError

Kind = Literal["auto", "flat", "pq", "ivfpq"]
MANIFEST, BUDGET, HEAD, FORMAT, VERSION = "index.json", "budget.json", "head.faiss", "omnicoder-index", 2
Progress = Callable[[str, int, int], None]
# OPQ learns 256 centroids per sub-quantizer on each of its rotation steps: below ~39 points per
# centroid faiss warns, and a rotation learned from so few points does not pay for its training.
OPQ_MIN_VECTORS = 39 * 256


@dataclass(frozen=True)
class IndexConfig:
    kind: Kind = "auto"
    metric: Literal["ip", "l2"] = "ip"
    bytes_per_vector: int | None = None  # PQ code size in bytes; None: from target_bytes
    target_bytes: int | None = None  # the whole index; auto picks the kind and code size to fit it
    nlist: int | None = None  # IVF lists; None: about 4 sqrt(n)
    nprobe: int = 16  # IVF lists visited per query
    shard_vectors: int = 65536
    # The sample the quantizers learn from; raised for codes wider than 8 bits to faiss's 39 points per
    # centroid (12-bit: 159,744), which recall needs there: 12-bit PQ96 at 16x on the retrieval bench's
    # 200k vectors reached 0.901 recall@10 (nprobe 64) from 65,536 points and 0.914 from 159,744.
    train_vectors: int = 65536
    opq: bool = True  # learn a rotation before PQ (OPQ) once there are OPQ_MIN_VECTORS to learn it from
    # Bits per sub-quantizer: 8 (256 centroids each); 12 spends the same bytes on fewer, wider
    # sub-vectors of 4096 centroids: closer codes (recall), but slower to train and to search (each
    # probed list's table is 16x larger).
    pq_bits: int = 8

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
        if not 4 <= self.pq_bits <= 16:
            raise RetrievalError(f"pq_bits must be between 4 and 16, got {self.pq_bits}")


@dataclass(frozen=True)
class Plan:
    kind: str
    m: int  # PQ sub-quantizers (bytes per code); 0 for flat
    nlist: int  # 0 unless IVF
    opq: bool = False  # a learned rotation in front (Ge et al. 2013: spreads variance across sub-spaces)
    bits: int = 8  # per sub-quantizer

    def factory(self, dim: int) -> str:
        pq = f"PQ{self.m}" if self.bits == 8 else f"PQ{self.m}x{self.bits}"
        ivf = {"flat": "IVF1,Flat", "pq": f"IVF1,{pq}", "ivfpq": f"IVF{self.nlist},{pq}"}[self.kind]
        return f"OPQ{self.m},{ivf}" if self.opq else ivf

    def code_bytes(self, dim: int) -> int:
        return 4 * dim if self.kind == "flat" else -(-self.m * self.bits // 8)


def plan(dim: int, n: int, config: IndexConfig) -> Plan:
    """The kind and sizes for n vectors of `dim`: PQ sub-quantizers from bytes_per_vector or target_bytes
    (the most, dividing dim, whose codes of pq_bits each fit), IVF once there are enough vectors to train
    its lists."""
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
    bits = config.pq_bits
    divisors = [m for m in range(1, dim + 1) if dim % m == 0 and -(-m * bits // 8) <= budget]
    if not divisors:
        raise RetrievalError(f"no PQ code of {bits}-bit sub-quantizers fits {budget} bytes per vector")
    m = max(divisors)
    nlist = 0
    if kind == "ivfpq":
        nlist = config.nlist or max(1, min(int(4 * math.sqrt(n)), n // 39))
        if n < 39 * nlist:
            raise RetrievalError(
                f"IVF with {nlist} lists needs at least {39 * nlist} vectors to train; got {n}"
            )
    if n < 1 << bits:  # each sub-quantizer learns 2^bits centroids
        raise RetrievalError(
            f"a PQ index of {bits}-bit codes needs at least {1 << bits} vectors to train; got {n}"
        )
    return Plan(kind, m, nlist, config.opq and train_size(n, bits, config) >= OPQ_MIN_VECTORS, bits)


def train_size(n: int, bits: int, config: IndexConfig) -> int:
    """How many of n vectors the quantizers learn from (see IndexConfig.train_vectors)."""
    return min(n, max(config.train_vectors, 39 << bits if bits > 8 else 0))


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


@contextmanager
def _blas_assignment():
    """k-means assigns points to centroids through BLAS, whatever the count. faiss's default loops
    over pairs below 128,000 points and is an order slower for PQ's low-dimensional sub-spaces
    (576 dims as PQ144: 99 s against 9 s to train on 20k points, one thread)."""
    old = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = 0
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_threshold = old


def _list_groups(ivf, sizes: np.ndarray, per_shard: int) -> list[np.ndarray]:
    """The IVF lists split into shards of about `per_shard` vectors, neighbouring lists together: the
    coarse centroids are clustered into as many groups as shards, and lists are taken group by group
    (nearest first) until a shard is full. A query's nearest lists then sit in few shards."""
    n_shards = max(1, -(-int(sizes.sum()) // per_shard))
    nonempty = np.flatnonzero(sizes)
    if n_shards == 1 or len(nonempty) <= n_shards:
        return [nonempty] if n_shards == 1 else [nonempty[i : i + 1] for i in range(len(nonempty))]
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)[nonempty]
    km = faiss.Kmeans(centroids.shape[1], n_shards, niter=20, seed=0, min_points_per_centroid=1)
    with _blas_assignment():
        km.train(centroids)
    dist, group = km.index.search(centroids, 1)
    order = nonempty[np.lexsort((dist[:, 0], group[:, 0]))]  # group by group, nearest the middle first
    out, cur, filled = [], [], 0
    for j in order:
        if cur and filled + sizes[j] > per_shard:
            out.append(np.array(cur, np.int64))
            cur, filled = [], 0
        cur.append(j)
        filled += sizes[j]
    out.append(np.array(cur, np.int64))
    return out


def _write_shard(
    path: Path, lists, group: np.ndarray, nlist: int, code_size: int, rows: tuple[int, int] | None
) -> int:
    """Lists `group` of `lists` (only entries rows[0]:rows[1] of a one-list group when given) as .npz
    arrays: sizes (nlist,), ids (n,), codes (n, code_size). Returns n."""
    sizes, ids, codes = np.zeros(nlist, np.int64), [], []
    for j in sorted(group.tolist()):  # in list order: the reader cuts the arrays by `sizes`
        n = lists.list_size(j)
        lo, hi = rows or (0, n)
        sizes[j] = hi - lo
        ids.append(faiss.rev_swig_ptr(lists.get_ids(j), n)[lo:hi].copy())
        codes.append(
            faiss.rev_swig_ptr(lists.get_codes(j), n * code_size)[lo * code_size : hi * code_size].copy()
        )
    with path.open("wb") as f:
        np.savez(f, sizes=sizes, ids=np.concatenate(ids), codes=np.concatenate(codes).reshape(-1, code_size))
    return int(sizes.sum())


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
        head = faiss.index_factory(dim, p.factory(dim), metric)
        rng = np.random.default_rng(0)
        t = train_size(n, p.bits, config)
        sample = x if t == n else x[np.sort(rng.choice(n, t, replace=False))]
        ivf = faiss.downcast_index(faiss.extract_index_ivf(head))  # IndexIVFPQ, with its .pq
        # Fewer than faiss's 39 points per centroid is the data's size, not a mistake: no warning print.
        ivf.cp.min_points_per_centroid = max(1, min(39, len(sample) // ivf.nlist))
        pq = getattr(ivf, "pq", None)
        if pq is not None:
            pq.cp.min_points_per_centroid = min(39, len(sample) // pq.ksub)
            # faiss's factory turns on polysemous training (renumbering each codebook so that Hamming
            # distances between codes follow real ones) for IVF-PQ. Nothing here searches by Hamming
            # distance, and for 4096-centroid (12-bit) codebooks its annealing ran for over half an
            # hour on the retrieval bench's 576-dim vectors without finishing.
            ivf.do_polysemous_training = False
        with _blas_assignment():
            head.train(sample)
        faiss.write_index(head, str(tmp / HEAD))
        report("adding vectors", 0, 1)
        full = faiss.clone_index(head)
        full.add_with_ids(x, np.arange(n, dtype=np.int64))
        lists = faiss.extract_index_ivf(full).invlists
        sizes = np.array([lists.list_size(j) for j in range(ivf.nlist)], np.int64)
        per = config.shard_vectors
        if ivf.nlist == 1:  # one list (PQ, Flat): split by vector range
            groups = [(np.zeros(1, np.int64), (lo, min(n, lo + per))) for lo in range(0, n, per)]
        else:
            groups = [(g, None) for g in _list_groups(ivf, sizes, per)]
        shards = []
        for s, (group, rows) in enumerate(groups):
            report("writing shards", s, len(groups))
            name = f"shard-{s:05d}.npz"
            count = _write_shard(tmp / name, lists, group, ivf.nlist, ivf.code_size, rows)
            shards.append(
                {"file": name, "count": count, "lists": group.tolist(), "bytes": (tmp / name).stat().st_size}
            )
        del full, lists
        manifest = {"format": FORMAT, "version": VERSION, "dim": dim, "count": n, "kind": p.kind,
                    "factory": p.factory(dim), "code_bytes": p.code_bytes(dim), "nlist": p.nlist,
                    "nprobe": config.nprobe, "metric": config.metric, "shards": shards,
                    "head": {"file": HEAD, "bytes": (tmp / HEAD).stat().st_size},
                    "config": asdict(config), "meta": meta or {}}  # fmt: skip
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        (tmp / BUDGET).write_text(json.dumps(budget_profile(manifest), indent=1))
        if extra is not None:
            extra(tmp)
        report("writing shards", len(groups), len(groups))
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
    """Bytes on disk and in memory: the head is always resident, shards up to the budget."""
    sizes = [s["bytes"] for s in manifest["shards"]]
    head = manifest["head"]["bytes"]
    total = head + sum(sizes)
    out = {"bytes_per_vector": total / max(manifest["count"], 1), "code_bytes": manifest["code_bytes"],
           "float32_bytes_per_vector": 4 * manifest["dim"], "compression": 4 * manifest["dim"] / manifest["code_bytes"],
           "head_bytes": head, "shard_bytes": sizes, "index_bytes": total, "largest_shard_bytes": max(sizes)}  # fmt: skip
    if budget_bytes is not None:
        out["budget_bytes"] = budget_bytes
        out["expected_resident_bytes"] = head + min(sum(sizes), budget_bytes)
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
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise RetrievalError(f"{path}: not an OmniCoder index manifest (format {FORMAT!r})")
    if m.get("version") != VERSION:
        raise RetrievalError(
            f"{path}: index format version {m.get('version')!r}; this build reads {VERSION}: rebuild it"
        )
    try:
        dim, count, shards = m["dim"], m["count"], m["shards"]
        if not (isinstance(dim, int) and 0 < dim < 1 << 16 and isinstance(count, int) and count >= 0):
            raise RetrievalError(f"{path}: dim and count must be positive integers")
        if m.get("metric") not in ("ip", "l2"):
            raise RetrievalError(f"{path}: metric must be ip or l2, got {m.get('metric')!r}")
        h = m["head"]
        if (
            h.get("file") != HEAD
            or not (folder / HEAD).is_file()
            or (folder / HEAD).stat().st_size != h["bytes"]
        ):
            raise RetrievalError(f"{folder / HEAD}: missing, or not the size {MANIFEST} gives")
        held = 0
        for s in shards:
            f = s["file"]
            if not isinstance(f, str) or "/" in f or "\\" in f or f.startswith("."):
                raise RetrievalError(f"{path}: shard file {f!r} is not a plain name inside the folder")
            if not isinstance(s["count"], int) or s["count"] <= 0 or not isinstance(s["lists"], list):
                raise RetrievalError(f"{path}: shard {f} needs a positive count and its list numbers")
            held += s["count"]
            if not (folder / f).is_file():
                raise RetrievalError(f"{folder / f}: missing (named by {MANIFEST})")
            if (folder / f).stat().st_size != s["bytes"]:
                raise RetrievalError(f"{folder / f}: {(folder / f).stat().st_size} bytes, the manifest says {s['bytes']} (truncated or replaced)")  # fmt: skip
        if held != count:
            raise RetrievalError(f"{path}: shards hold {held} vectors, the manifest says {count}")
    except (KeyError, TypeError) as e:
        raise RetrievalError(f"{path}: lacks the field {e}") from None
    return m


@dataclass(frozen=True)
class SearchStats:
    shard_loads: int  # shards mapped in (first use or after eviction)
    evictions: int
    open_bytes: int  # file bytes of the shards open now
    peak_open_bytes: int


def _transforms(head: faiss.Index) -> list[faiss.VectorTransform]:
    """The vector transforms (OPQ's rotation) an index applies before its IVF, in order."""
    if not isinstance(head, faiss.IndexPreTransform):  # faiss.read_index gives the downcast type
        return []
    return [faiss.downcast_VectorTransform(head.chain.at(i)) for i in range(head.chain.size())]


class ShardedIndex:
    """An index folder searched with at most `budget_bytes` of shards loaded at once (None: no limit).
    Not thread-safe: a search swaps each shard's lists into the one head in turn."""

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
        self.head = self._read_head()
        self._ivf = faiss.extract_index_ivf(self.head)
        self._rotate = _transforms(self.head)
        self._ivf.nprobe = min(self.nprobe, self._ivf.nlist)
        # Empty lists of ours, in the head between searches: faiss frees the head's own on the first
        # swap, and must never free a shard's (Python owns those).
        self._empty = faiss.ArrayInvertedLists(self._ivf.nlist, self._ivf.code_size)
        self._ivf.replace_invlists(self._empty, False)
        self._shard_of = np.full(self._ivf.nlist, -1, np.int64)  # IVF list -> the shard holding it
        for i, sh in enumerate(m["shards"]):
            lists = np.asarray(sh["lists"], np.int64)
            if lists.size == 0 or lists.min() < 0 or lists.max() >= self._ivf.nlist:
                raise RetrievalError(
                    f"{self.folder / MANIFEST}: shard {sh['file']} names lists outside 0..{self._ivf.nlist - 1}"
                )
            self._shard_of[lists] = i
        self._open: OrderedDict[int, faiss.InvertedLists] = OrderedDict()
        self._bytes = 0
        self._loads = self._evictions = self._peak = 0

    @classmethod
    def open(
        cls, folder: str | Path, budget_bytes: int | None = None, nprobe: int | None = None
    ) -> ShardedIndex:
        return cls(folder, budget_bytes, nprobe)

    def _read_head(self) -> faiss.Index:
        path = self.folder / HEAD
        try:  # without IVF-PQ's precomputed tables: nlist x M x 256 floats (264 MB for 1788 lists of PQ144)
            head = faiss.read_index(str(path), faiss.IO_FLAG_SKIP_PRECOMPUTE_TABLE)
        except RuntimeError as e:
            raise RetrievalError(f"{path}: faiss cannot read it: {' '.join(str(e).split())[:160]}") from None
        ivf = faiss.try_extract_index_ivf(head)
        dims = [(t.d_in, t.d_out) for t in _transforms(head)]
        chained = all(a[1] == b[0] for a, b in itertools.pairwise(dims)) and (
            not dims or (dims[0][0] == self.dim and ivf is not None and dims[-1][1] == ivf.d)
        )
        if head.d != self.dim or ivf is None or not chained or not head.is_trained or head.ntotal != 0:
            raise RetrievalError(
                f"{path}: not the trained, empty IVF index of dim {self.dim} {MANIFEST} describes"
            )
        # The tables would sit beside the shards, outside the budget: each probed list's distance table is
        # computed per query instead (same results; see test_index).
        if isinstance(pq := faiss.downcast_index(ivf), faiss.IndexIVFPQ):
            pq.use_precomputed_table = -1
        return head

    def _shard(self, i: int) -> faiss.InvertedLists:
        if i in self._open:
            self._open.move_to_end(i)
            return self._open[i]
        size = self.manifest["shards"][i]["bytes"]
        while self._open and self.budget_bytes is not None and self._bytes + size > self.budget_bytes:
            j, _ = self._open.popitem(last=False)  # dropping the last reference frees the lists
            self._bytes -= self.manifest["shards"][j]["bytes"]
            self._evictions += 1
        lists = self._read_shard(i)
        self._open[i] = lists
        self._bytes += size
        self._loads += 1
        self._peak = max(self._peak, self._bytes)
        return lists

    def _read_shard(self, i: int) -> faiss.ArrayInvertedLists:
        """Shard i's lists, every array checked against the head and the manifest before faiss sees it."""
        sh = self.manifest["shards"][i]
        path = self.folder / sh["file"]
        nlist, code_size = self._ivf.nlist, self._ivf.code_size
        try:
            with np.load(path, allow_pickle=False) as z:
                sizes, ids, codes = z["sizes"], z["ids"], z["codes"]
        except (OSError, ValueError, KeyError, EOFError) as e:
            raise RetrievalError(f"{path}: not a readable shard: {' '.join(str(e).split())[:160]}") from None
        n = sh["count"]
        if (sizes.shape != (nlist,) or sizes.dtype != np.int64 or ids.shape != (n,) or ids.dtype != np.int64
                or codes.shape != (n, code_size) or codes.dtype != np.uint8 or sizes.min() < 0
                or int(sizes.sum()) != n or (n and (ids.min() < 0 or ids.max() >= self.count))):  # fmt: skip
            raise RetrievalError(f"{path}: its arrays do not match {HEAD} and {MANIFEST}")
        lists = faiss.ArrayInvertedLists(nlist, code_size)
        ends = np.cumsum(sizes)
        for j in np.flatnonzero(sizes).tolist():
            lo, hi = int(ends[j] - sizes[j]), int(ends[j])
            lists.add_entries(j, hi - lo, faiss.swig_ptr(ids[lo:hi]), faiss.swig_ptr(codes[lo:hi]))
        return lists

    def _transform(self, queries: np.ndarray) -> np.ndarray:
        """Queries in the space the lists are searched in (after OPQ's rotation, where there is one)."""
        for t in self._rotate:
            queries = t.apply(queries)
        return queries

    def shards_for(self, queries: np.ndarray) -> list[int]:
        """The shards holding the lists the queries probe (every shard for one-list kinds)."""
        return self._shards_for(self._transform(queries))

    def _shards_for(self, queries: np.ndarray) -> list[int]:
        if self._ivf.nlist == 1:
            return list(range(len(self.manifest["shards"])))
        _, probed = self._ivf.quantizer.search(queries, self._ivf.nprobe)
        return sorted(set(self._shard_of[probed[probed >= 0]].tolist()) - {-1})

    def search(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Scores and ids (q, k) of the k best vectors for each query (ids -1 where fewer exist)."""
        q = _check_vectors(queries, "queries")
        if q.shape[1] != self.dim:
            raise RetrievalError(f"queries have dim {q.shape[1]}; the index holds vectors of dim {self.dim}")
        if k < 1:
            raise RetrievalError(f"k must be >= 1, got {k}")
        scores = np.full((q.shape[0], 0), -np.inf, np.float32)
        ids = np.zeros((q.shape[0], 0), np.int64)
        q = self._transform(q)
        need = self._shards_for(q)
        order = [i for i in self._open if i in need] + [i for i in need if i not in self._open]
        for i in order:  # loaded shards first: no load wasted on a shard about to be dropped
            lists = self._shard(i)
            self._ivf.replace_invlists(lists, False)
            self._ivf.ntotal = self.manifest["shards"][i]["count"]
            try:
                d, j = self._ivf.search(q, k)
            finally:
                self._ivf.replace_invlists(self._empty, False)
                self._ivf.ntotal = 0
            if self.manifest["metric"] == "l2":
                d = -d  # higher is closer, as for inner product
            d = np.where(j >= 0, d, -np.inf)
            scores, ids = np.concatenate([scores, d], axis=1), np.concatenate([ids, j], axis=1)
            top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            scores, ids = np.take_along_axis(scores, top, 1), np.take_along_axis(ids, top, 1)
        short = k - scores.shape[1]  # fewer than k found (or no shard probed)
        if short > 0:
            scores = np.pad(scores, ((0, 0), (0, short)), constant_values=-np.inf)
            ids = np.pad(ids, ((0, 0), (0, short)), constant_values=-1)
        return scores, ids

    @property
    def stats(self) -> SearchStats:
        return SearchStats(self._loads, self._evictions, self._bytes, self._peak)

    def close(self) -> None:
        self._open.clear()
        self._bytes = 0
