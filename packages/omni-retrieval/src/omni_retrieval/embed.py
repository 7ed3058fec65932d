"""Text into vectors: chunks of a folder of text files, embedded by a sentence encoder or by the
loaded language model.

A chunk is `chunk_tokens` tokens (of the embedder's own tokenizer) of one file; consecutive chunks
overlap by `overlap`, an eighth by default. Two embedders, both giving L2-normalised vectors, so
inner product is cosine similarity:
- "minilm": all-MiniLM-L6-v2 (omni_retrieval.minilm), a sentence encoder trained for retrieval;
- "lm": the mean over a chunk's tokens of one layer's hidden states of an omni_model decoder.
An index records its embedder (`Embedder.spec`) in its manifest, so that questions are embedded the
way its chunks were (`open_embedder`). Chunks are kept as JSON lines beside an index (file, start
token, text) so that a search can show what it found.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

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


class Embedder:
    """Token ids of `tokenizer` -> L2-normalised vectors (n, dim); `spec` reopens it (open_embedder)."""

    tokenizer: Any  # encode(text) -> ids, decode(ids) -> text
    dim: int
    spec: dict

    def __call__(self, batch: list[list[int]]) -> np.ndarray: ...

    def embed_text(self, text: str, max_tokens: int) -> np.ndarray:
        """The (1, dim) vector of `text`'s last `max_tokens` tokens (a question, a query)."""
        ids = self.tokenizer.encode(text)[-max_tokens:]
        if not ids:
            raise RetrievalError("the text to look up is empty")
        return self([ids])


class MiniLMEmbedder(Embedder):
    def __init__(self, encoder=None) -> None:
        from omni_retrieval.minilm import SentenceEncoder

        self.encoder = encoder or SentenceEncoder.default()
        self.tokenizer, self.dim = self.encoder.tokenizer, self.encoder.dim
        self.spec = {"kind": "minilm", "name": self.encoder.name}

    def __call__(self, batch: list[list[int]]) -> np.ndarray:
        return self.encoder.embed_ids(batch)


class LMEmbedder(Embedder):
    """Mean-pooled hidden states of `layer` (negative counts from the end) of an omni_model decoder."""

    def __init__(self, model, layer: int = -1, *, tokenizer=None, name: str = "") -> None:
        n = len(model.layers)
        if not -n <= layer < n:
            raise RetrievalError(f"layer {layer} is out of range for a model of {n} layers")
        self.model, self.layer, self.tokenizer = model, layer % n, tokenizer
        self.dim = model.config.dim
        self.spec = {"kind": "lm", "model": name, "layer": layer}

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


def open_embedder(spec: dict, lm=None) -> Embedder:
    """The embedder an index manifest names; `lm`: an already loaded omni_model LoadedModel to use
    for an "lm" embedder (None loads the one named)."""
    kind = spec.get("kind", "lm")  # indices built before MiniLM name no kind
    if kind == "minilm":
        return MiniLMEmbedder()
    if kind != "lm":
        raise RetrievalError(f"unknown embedder {kind!r} (minilm or lm)")
    import omni_model

    lm = lm or omni_model.load(spec["model"], fuse=False)
    return LMEmbedder(lm.model, spec["layer"], tokenizer=lm.tokenizer, name=spec.get("model", ""))


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


CHUNKS = "chunks.jsonl"


def build_text_index(
    source: str | Path, out: str | Path, embedder: Embedder, config=None, *, chunk_tokens: int = 128,
    meta: dict | None = None, on_progress: Callable[[str, int, int], None] | None = None,
) -> dict:  # fmt: skip
    """The index of `source`'s chunks (omni_retrieval.index.build_index), its embedder and chunks file
    in the manifest and chunks.jsonl beside it, so that it can be queried with text; returns the manifest."""
    from omni_retrieval.index import build_index

    report = on_progress or (lambda what, done, total: None)
    vectors, chunks = embed_source(source, embedder.tokenizer, embedder, chunk_tokens=chunk_tokens,
                                   on_progress=lambda done, total: report("embedding", done, total))  # fmt: skip
    meta = (meta or {}) | {"embedding": {**embedder.spec, "chunk_tokens": chunk_tokens}, "chunks": CHUNKS}
    return build_index(vectors, out, config, meta=meta, on_progress=on_progress,
                       extra=lambda folder: write_chunks(chunks, folder / CHUNKS))  # fmt: skip


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
