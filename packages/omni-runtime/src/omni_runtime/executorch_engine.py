"""The ExecuTorch engine: an omni_export ExecuTorch folder (.pte, XNNPACK) run by `executorch.runtime`.

The runtime the phone links is the one that runs here: the same program, the same XNNPACK kernels,
ExecuTorch's LLM operators (update_cache, custom_sdpa) and quantized kernels (embedding_byte). The
KV cache lives inside the program as mutable buffers shared by its two methods; the engine keeps
only the count of valid positions and passes it as `start`. Rolling back moves that count: the next
call writes over the rejected entries, and attention never reads past start + T.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from omni_model.files import native_stderr_silenced, read_json
from omni_runtime.engine import EngineError

MANIFEST = "manifest.json"
FORMAT = "omnicoder-executorch"


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The folder's manifest.json, checked for the fields the engine needs."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise EngineError(f"{folder}: no such folder")
    if not path.is_file():
        raise EngineError(f"{folder}: no {MANIFEST} (not an exported model folder; see press-play export)")
    m = read_json(path, EngineError)
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise EngineError(f"{path}: not an OmniCoder ExecuTorch manifest (format is not {FORMAT!r})")
    try:
        for key in ("max_seq_len", "prefill_chunk"):
            if not isinstance(m[key], int) or m[key] <= 0:
                raise EngineError(f"{path}: {key} must be a positive integer, got {m[key]!r}")
        if not isinstance(m["config"]["vocab_size"], int) or m["config"]["vocab_size"] <= 0:
            raise EngineError(f"{path}: config.vocab_size must be a positive integer")
        program = m["program"]
        if not isinstance(program, str) or "/" in program or "\\" in program or program.startswith("."):
            raise EngineError(f"{path}: program must be a file name inside the folder, got {program!r}")
    except (KeyError, TypeError) as e:
        raise EngineError(f"{path}: lacks the field {e}") from None
    if not (folder / program).is_file():
        raise EngineError(f"{folder / program}: no such file (named by {MANIFEST})")
    return m


def is_executorch_folder(folder: str | Path) -> bool:
    try:
        m = json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False
    return isinstance(m, dict) and m.get("format") == FORMAT


def _runtime() -> Any:
    """executorch.runtime with the LLM and quantized kernels registered, quietly."""
    import logging
    import warnings

    # torch's pytree logs a deprecation at WARNING through its own handler when torchao registers enums
    loggers = [logging.getLogger(), logging.getLogger("torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import executorch.extension.llm.custom_ops.custom_ops
            import executorch.kernels.quantized  # noqa: F401 (embedding_byte)
            from executorch.extension.pybindings import portable_lib
            from executorch.runtime import Runtime
    except ImportError as e:
        raise EngineError(
            f"the ExecuTorch engine needs the executorch package (omni-runtime[executorch]): {e}"
        ) from None
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
    return Runtime, portable_lib


class ExecuTorchEngine:
    name = "executorch"

    def __init__(self, folder: str | Path, *, threads: int = 2, max_seq_len: int | None = None) -> None:
        """`threads`: XNNPACK's thread pool (one per process: the last engine made sets it)."""
        import torch

        self._torch = torch
        self.folder = Path(folder)
        self.manifest = m = read_manifest(self.folder)
        runtime, portable_lib = _runtime()
        if threads < 1:
            raise EngineError(f"threads must be positive, got {threads}")
        try:
            with native_stderr_silenced():
                if portable_lib._threadpool_get_thread_count() != threads:
                    portable_lib._unsafe_reset_threadpool(threads)
                program = runtime.get().load_program(self.folder / m["program"])
                self._prefill = program.load_method("prefill")
                self._decode = program.load_method("decode")
        except Exception as e:  # the bindings raise RuntimeError/ValueError with multi-line logs
            raise EngineError(
                f"{self.folder / m['program']}: ExecuTorch cannot load it: {' '.join(str(e).split())[:200]}"
            ) from None
        self.vocab_size = m["config"]["vocab_size"]
        self.max_seq_len = min(max_seq_len or m["max_seq_len"], m["max_seq_len"])
        self.prefill_chunk = m["prefill_chunk"]
        self._len = 0

    @property
    def seq_len(self) -> int:
        return self._len

    def forward(self, ids: Sequence[int], last_only: bool = True) -> np.ndarray:
        torch = self._torch
        x = np.asarray(ids, dtype=np.int64).reshape(-1)
        n = len(x)
        if n == 0:
            raise EngineError("forward needs at least one token")
        if self._len + n > self.max_seq_len:
            raise EngineError(f"{self._len + n} tokens exceed the engine's max_seq_len of {self.max_seq_len}")
        if x.min() < 0 or x.max() >= self.vocab_size:
            raise EngineError(f"token ids must be in 0..{self.vocab_size - 1}")
        tokens = torch.from_numpy(x).view(1, -1)
        if n == 1:
            out = self._decode.execute([tokens, torch.tensor([self._len])])[0][0].numpy()
            self._len += 1
            return out.copy()
        rows = []
        for s in range(0, n, self.prefill_chunk):
            part = tokens[:, s : s + self.prefill_chunk]
            logits = self._prefill.execute([part, torch.tensor([self._len])])[0][0]
            self._len += part.shape[1]
            rows.append(logits[-1:].numpy().copy() if last_only else logits.numpy().copy())
        return rows[-1] if last_only else np.concatenate(rows)

    def rollback(self, n: int) -> None:
        if not 0 <= n <= self._len:
            raise EngineError(f"cannot roll back {n} tokens; the cache holds {self._len}")
        self._len -= n

    def reset(self) -> None:
        self._len = 0
