"""omni-retrieval: vector indices that live on flash and page into a bounded amount of RAM.

`build_index` writes faiss Flat / PQ / IVF-PQ shards (sizes chosen from a byte target when not
given) atomically; `ShardedIndex` searches them with at most a budget of shards open. `omni_retrieval
.embed` turns a folder of text into chunks and vectors with the loaded language model.
"""

from omni_retrieval.errors import RetrievalError
from omni_retrieval.index import IndexConfig, ShardedIndex, build_index, load_vectors, read_manifest

__all__ = ["IndexConfig", "RetrievalError", "ShardedIndex", "build_index", "load_vectors", "read_manifest"]
