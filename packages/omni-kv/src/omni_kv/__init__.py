"""KV caches for OmniCoder decoders.

The cache is an argument of the model's forward (as in mlx-lm and nanochat), never state hidden in a
layer. Every cache kind implements the `KVCache` protocol; attention calls `update` once per layer
and the decoder calls `advance` once per forward. `DenseKVCache` holds keys and values per kv
head; `LatentKVCache` the compressed latent and shared rotary key of latent attention (MLA);
`QuantizedKVCache` keys and values as int8, int4 (KIVI's layout) or NF4 codes; `SinkWindowKVCache`
the first few tokens and a window of the last ones (StreamingLLM); `PagedKVCache` dense pages under a
resident-bytes budget, the cold ones spilled to a memory-mapped file. `CacheSpec` names one of them as
configuration, and plans contexts against a memory budget.
"""

from omni_kv.dense import DenseKVCache
from omni_kv.latent import LatentKVCache
from omni_kv.paged import PagedKVCache, PagedStats
from omni_kv.protocol import CacheFullError, KVCache, KVCacheError
from omni_kv.quantized import KVQuantConfig, QuantizedKVCache, QuantizedLatentKVCache, StreamSpec
from omni_kv.spec import CacheSpec
from omni_kv.window import SinkWindowKVCache, SinkWindowLatentKVCache

__all__ = ["CacheFullError", "CacheSpec", "DenseKVCache", "KVCache", "KVCacheError", "KVQuantConfig",
           "LatentKVCache", "PagedKVCache", "PagedStats", "QuantizedKVCache", "QuantizedLatentKVCache", "SinkWindowKVCache", "SinkWindowLatentKVCache", "StreamSpec"]  # fmt: skip
