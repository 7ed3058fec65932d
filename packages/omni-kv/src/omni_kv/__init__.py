"""KV caches for OmniCoder decoders.

The cache is an argument of the model's forward (as in mlx-lm and nanochat), never state hidden in a
layer. Every cache kind implements the `KVCache` protocol; attention calls `update` once per layer
and the decoder calls `advance` once per forward. `DenseKVCache` holds keys and values per kv
head; `LatentKVCache` the compressed latent and shared rotary key of latent attention (MLA).
"""

from omni_kv.dense import DenseKVCache
from omni_kv.latent import LatentKVCache
from omni_kv.protocol import CacheFullError, KVCache, KVCacheError

__all__ = ["CacheFullError", "DenseKVCache", "KVCache", "KVCacheError", "LatentKVCache"]
