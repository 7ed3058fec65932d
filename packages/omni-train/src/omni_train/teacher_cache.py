"""The teacher's top-k logits for every training window, computed once and kept on disk, so that
distillation runs (and epochs, and resumed runs) do not pay for the teacher again.

    cache.json        format, teacher identity, the token array's sha256, seq_len, k, windows, done
    values.f16        (windows, seq_len, k) float16: the k largest logits at each position
    ids.i32           (windows, seq_len, k) int32: their token ids
    lse.f32           (windows, seq_len) float32: logsumexp of all the logits / temperature, so that the
                      top k's probabilities are exact and the rest of the vocabulary keeps its mass

Windows are the loader's: window w is tokens[w*seq_len : (w+1)*seq_len] (`Batches` serves exactly
these). The build writes into preallocated memory maps and records its progress in cache.json after
each chunk, so an interrupted build goes on where it stopped; a cache whose identity, sizes or
progress do not match is rebuilt, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from omni_train.errors import TrainError

MANIFEST, FORMAT, VERSION = "cache.json", "omnicoder-teacher-topk", 2
Progress = Callable[[str, int, int], None]


def tokens_sha256(tokens: np.ndarray) -> str:
    h = hashlib.sha256()
    step = 1 << 22
    for s in range(0, len(tokens), step):
        h.update(np.ascontiguousarray(tokens[s : s + step]).tobytes())
    return h.hexdigest()


class TeacherCache:
    def __init__(self, folder: Path, meta: dict[str, Any]) -> None:
        self.folder, self.meta = folder, meta
        shape = (meta["windows"], meta["seq_len"], meta["k"])
        self.values = np.memmap(folder / "values.f16", np.float16, "r", shape=shape)
        self.ids = np.memmap(folder / "ids.i32", np.int32, "r", shape=shape)
        self.lse = np.memmap(folder / "lse.f32", np.float32, "r", shape=shape[:2])

    @property
    def k(self) -> int:
        return self.meta["k"]

    @property
    def temperature(self) -> float:
        return self.meta["temperature"]

    def lookup(self, windows: np.ndarray) -> tuple[Tensor, Tensor, Tensor]:
        """Top-k logits (B, T, k) float32, their ids (B, T, k) int64 and the logsumexp of all logits /
        temperature (B, T) of the given windows."""
        return (torch.from_numpy(np.asarray(self.values[windows], np.float32)),
                torch.from_numpy(np.asarray(self.ids[windows], np.int64)),
                torch.from_numpy(np.asarray(self.lse[windows], np.float32)))  # fmt: skip

    @classmethod
    def open(cls, folder: str | Path, identity: dict[str, Any]) -> TeacherCache:
        """A complete cache made for `identity` (teacher, tokens, seq_len, k); TrainError otherwise."""
        folder = Path(folder)
        meta = _read(folder)
        if meta is None:
            raise TrainError(f"{folder}: no teacher cache ({MANIFEST} missing or unreadable)")
        if {k: meta.get(k) for k in identity} != identity:
            raise TrainError(f"{folder}: a teacher cache of another teacher, dataset, seq_len or k")
        if meta["done"] != meta["windows"]:
            raise TrainError(f"{folder}: incomplete ({meta['done']} of {meta['windows']} windows)")
        _check_sizes(folder, meta)
        return cls(folder, meta)

    @classmethod
    @torch.inference_mode()
    def build(cls, teacher: nn.Module, tokens: np.ndarray, folder: str | Path, *, seq_len: int, k: int,
              teacher_id: str, temperature: float = 1.0, batch_size: int = 8,
              on_progress: Progress | None = None) -> TeacherCache:  # fmt: skip
        """Compute (or finish, or reuse) the cache of `teacher` over `tokens`."""
        if not (isinstance(k, int) and 1 <= k <= 4096) or not (isinstance(seq_len, int) and seq_len >= 1):
            raise TrainError(
                f"teacher cache: need 1 <= k <= 4096 and seq_len >= 1, got k={k}, seq_len={seq_len}"
            )
        report = on_progress or (lambda what, done, total: None)
        folder = Path(folder)
        windows = (len(tokens) - 1) // seq_len
        if windows < 1:
            raise TrainError(f"teacher cache: {len(tokens)} tokens are fewer than one window of {seq_len}")
        if not (isinstance(temperature, int | float) and temperature > 0):
            raise TrainError(f"teacher cache: temperature must be positive, got {temperature!r}")
        identity = {"teacher": teacher_id, "tokens": tokens_sha256(tokens), "seq_len": seq_len, "k": k,
                    "temperature": float(temperature), "windows": windows}  # fmt: skip
        meta = _read(folder)
        fresh = meta is None or {key: meta.get(key) for key in identity} != identity
        if not fresh:
            try:
                _check_sizes(folder, meta)
            except TrainError:
                fresh = True
        shape = (windows, seq_len, k)
        if fresh:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / MANIFEST).unlink(missing_ok=True)  # first: a half-made cache never looks complete
            for name, dtype, sh in (("values.f16", np.float16, shape), ("ids.i32", np.int32, shape),
                                    ("lse.f32", np.float32, shape[:2])):  # fmt: skip
                np.memmap(folder / name, dtype, "w+", shape=sh).flush()
            meta = {"format": FORMAT, "version": VERSION, **identity, "done": 0}
            _write(folder, meta)
        values = np.memmap(folder / "values.f16", np.float16, "r+", shape=shape)
        ids = np.memmap(folder / "ids.i32", np.int32, "r+", shape=shape)
        lse = np.memmap(folder / "lse.f32", np.float32, "r+", shape=shape[:2])
        teacher.eval()
        done = meta["done"]
        while done < windows:
            report("teacher top-k logits", done, windows)
            hi = min(windows, done + batch_size)
            starts = np.arange(done, hi) * seq_len
            x = torch.from_numpy(np.asarray(tokens[starts[:, None] + np.arange(seq_len)], np.int64))
            logits = teacher(x).float()
            top = logits.topk(k, dim=-1)
            values[done:hi] = top.values.numpy().astype(np.float16)
            ids[done:hi] = top.indices.numpy().astype(np.int32)
            lse[done:hi] = torch.logsumexp(logits / temperature, dim=-1).numpy()
            for m in (values, ids, lse):
                m.flush()
            done = hi
            _write(folder, {**meta, "done": done})  # after the data: progress never runs ahead of it
        report("teacher top-k logits", windows, windows)
        del values, ids, lse
        return cls.open(folder, identity)


def _read(folder: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        return None
    for key in ("seq_len", "k", "windows", "done"):
        v = meta.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0 or v > 1 << 40:
            return None
    if meta["done"] > meta["windows"] or not meta["seq_len"] or not meta["k"]:
        return None
    t = meta.get("temperature")
    if not isinstance(t, float) or not t > 0:
        return None
    return meta


def _check_sizes(folder: Path, meta: dict[str, Any]) -> None:
    n = meta["windows"] * meta["seq_len"] * meta["k"]
    for name, size in (("values.f16", 2 * n), ("ids.i32", 4 * n), ("lse.f32", 4 * n // meta["k"])):
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            raise TrainError(f"{path}: missing or not the {size} bytes {MANIFEST} implies")


def _write(folder: Path, meta: dict[str, Any]) -> None:
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, folder / MANIFEST)
