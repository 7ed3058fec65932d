"""Retrieval-augmented prompts: the chunks of an index nearest to a question, put in front of it as
chat messages, with the sources kept for the caller to report.

The index must have been built from text (`press-play index build`): its manifest names the embedder
of its chunks (all-MiniLM-L6-v2, or a model and layer), and the question is embedded the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omni_retrieval.embed import open_embedder, read_chunks
from omni_retrieval.errors import RetrievalError
from omni_retrieval.index import ShardedIndex, read_manifest


@dataclass(frozen=True)
class Source:
    file: str
    start: int  # first token of the chunk in its file
    score: float
    text: str


class Retriever:
    def __init__(self, folder: str | Path, *, embed_model=None, budget_bytes: int | None = None) -> None:
        """`embed_model`: an omni_model LoadedModel to embed questions with when the index was embedded
        by a language model; None loads the one the index names. It must be the model that embedded
        the chunks."""
        self.folder = Path(folder)
        m = read_manifest(self.folder)
        emb = m["meta"].get("embedding")
        if not emb or not m["meta"].get("chunks"):
            raise RetrievalError(f"{self.folder}: built from vectors, not text: nothing to put in a prompt")
        self.embed = open_embedder(emb, embed_model)
        if self.embed.dim != m["dim"]:
            raise RetrievalError(
                f"{self.folder}: chunks embedded in {m['dim']} dims; this embedder makes {self.embed.dim}"
            )
        self.chunk_tokens, self.chunks = emb["chunk_tokens"], self.folder / m["meta"]["chunks"]
        self.index = ShardedIndex(self.folder, budget_bytes)

    def __call__(self, question: str, k: int = 3) -> list[Source]:
        scores, hits = self.index.search(self.embed.embed_text(question, self.chunk_tokens), k)
        found = read_chunks(self.chunks, hits[0].tolist())
        return [Source(c.file, c.start, float(s), c.text) for s, c in zip(scores[0], found, strict=True) if c]


def rag_messages(question: str, sources: list[Source], system: str | None = None) -> list[dict[str, str]]:
    """Chat messages: the passages (numbered) in the system message, then the question."""
    passages = "\n\n".join(
        f"[{i}] ({Path(s.file).name}) {' '.join(s.text.split())}" for i, s in enumerate(sources, 1)
    )
    intro = system or "Answer the question using these passages; say which passage the answer comes from."
    return [{"role": "system", "content": f"{intro}\n\n{passages}"}, {"role": "user", "content": question}]
