"""omni-retrieval: vector indices that live on flash and page into a bounded amount of RAM.

`build_index` writes faiss Flat / PQ / IVF-PQ shards (sizes chosen from a byte target when not
given) atomically; `ShardedIndex` searches them with at most a budget of shards open. `omni_retrieval
.embed` turns a folder of text into chunks and vectors with the loaded language model;
`SentenceEncoder` (all-MiniLM-L6-v2) embeds sentences on its own. It is imported on first use, so
that importing omni_retrieval costs no torch.
"""

from typing import TYPE_CHECKING, Any

from omni_retrieval.errors import RetrievalError
from omni_retrieval.index import IndexConfig, ShardedIndex, build_index, load_vectors, read_manifest

if TYPE_CHECKING:
    from omni_retrieval.minilm import SentenceEncoder

__all__ = [
    "IndexConfig",
    "RetrievalError",
    "SentenceEncoder",
    "ShardedIndex",
    "build_index",
    "load_vectors",
    "read_manifest",
]


def __getattr__(name: str) -> Any:
    if name == "SentenceEncoder":
        from omni_retrieval.minilm import SentenceEncoder

        return SentenceEncoder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
