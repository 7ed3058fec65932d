"""Text into vectors: chunks of a folder of text files, embedded by the loaded language model.

A chunk is `chunk_tokens` tokens of one file (consecutive chunks overlap by `overlap`, an eighth by default). Its vector is
the mean over its tokens of one layer's hidden states (the residual stream after that layer), L2
normalised, so inner product is cosine similarity. Chunks are kept as JSON lines beside an index
(file, start token, text) so that a search can show what it found.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from omni_retrieval.errors import RetrievalError

TEXT_SUFFIXES = (".txt", ".md")


@dataclass(frozen=True)
class Chunk:
    file: str
    start: int  # first token
    text: str


def text_files(source: str | Path) -> list[Path]:
    src = Path(source)
    if src.is_file():
        return [src]
    if not src.is_dir():
        raise RetrievalError(f"{src}: no such file or folder")
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    if not files:
        raise RetrievalError(f"{src}: holds no text files ({', '.join(TEXT_SUFFIXES)})")
    return files


def chunk_files(
    files: list[Path], tokenizer, chunk_tokens: int = 128, overlap: int = 16
) -> Iterator[tuple[Chunk, list[int]]]:
    if chunk_tokens < 2 or not 0 <= overlap < chunk_tokens:
        raise RetrievalError(
            f"chunk_tokens must be >= 2 and 0 <= overlap < chunk_tokens; got {chunk_tokens}, {overlap}"
        )
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise RetrievalError(f"{f}: not readable UTF-8 text: {' '.join(str(e).split())[:120]}") from None
        ids = tokenizer.encode(text)
        for s in range(0, max(len(ids) - overlap, 1), chunk_tokens - overlap):
            part = ids[s : s + chunk_tokens]
            if len(part) >= 2:
                yield Chunk(str(f), s, tokenizer.decode(part)), part


class LMEmbedder:
    """Mean-pooled hidden states of `layer` (negative counts from the end) of an omni_model decoder."""

    def __init__(self, model, layer: int = -1) -> None:
        n = len(model.layers)
        if not -n <= layer < n:
            raise RetrievalError(f"layer {layer} is out of range for a model of {n} layers")
        self.model, self.layer = model, layer % n
        self.dim = model.config.dim

    @torch.inference_mode()
    def __call__(self, batch: list[list[int]]) -> np.ndarray:
        out = np.zeros((len(batch), self.dim), np.float32)
        captured: list[torch.Tensor] = []
        hook = self.model.layers[self.layer].register_forward_hook(lambda m, i, o: captured.append(o))
        try:
            for r, ids in enumerate(batch):  # one sequence at a time: chunks differ in length
                captured.clear()
                self.model.hidden_states(torch.tensor([ids]))
                h = captured[-1][0].float().mean(dim=0)
                out[r] = (h / h.norm().clamp_min(1e-8)).numpy()
        finally:
            hook.remove()
        return out


def embed_source(
    source: str | Path, tokenizer, embedder: Callable[[list[list[int]]], np.ndarray], *, chunk_tokens: int = 128,
    overlap: int | None = None, batch: int = 16, on_progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, list[Chunk]]:  # fmt: skip
    """Vectors (n, dim) and chunks of every text file under `source` (overlap: chunk_tokens // 8 by default)."""
    overlap = chunk_tokens // 8 if overlap is None else overlap
    pairs = list(chunk_files(text_files(source), tokenizer, chunk_tokens, overlap))
    if not pairs:
        raise RetrievalError(f"{source}: its text files hold fewer than 2 tokens")
    vecs = []
    for i in range(0, len(pairs), batch):
        vecs.append(embedder([ids for _, ids in pairs[i : i + batch]]))
        if on_progress is not None:
            on_progress(min(i + batch, len(pairs)), len(pairs))
    return np.concatenate(vecs), [c for c, _ in pairs]


def write_chunks(chunks: list[Chunk], path: Path) -> None:
    with path.open("w", encoding="utf-8") as f:
        for c in chunks:
            f.write(json.dumps(asdict(c)) + "\n")


def read_chunks(path: Path, ids: list[int]) -> list[Chunk | None]:
    """The chunks at line numbers `ids` (None where out of range)."""
    want = {i for i in ids if i >= 0}
    found: dict[int, Chunk] = {}
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f):
            if n in want:
                try:
                    found[n] = Chunk(**json.loads(line))
                except (ValueError, TypeError):
                    raise RetrievalError(f"{path}: line {n + 1} is not a chunk record") from None
    return [found.get(i) for i in ids]
