"""The Engine protocol: what the generate loop, perplexity and benchmarks ask of a backend.

An engine holds one sequence's KV cache. `forward(ids)` appends the tokens and returns float32
logits as a numpy array (T, V), or (1, V) with `last_only`; `rollback(n)` forgets the last n tokens
(speculative decoding); `reset()` empties the cache. Logits cross as numpy so that one loop serves
the PyTorch engine and the ONNX Runtime one, which must not import torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from omni_model.errors import OmniError


class EngineError(OmniError):
    """An engine cannot serve a request (sequence too long, bad token ids, broken model folder)."""


@runtime_checkable
class Engine(Protocol):
    name: str
    vocab_size: int
    max_seq_len: int

    @property
    def seq_len(self) -> int:
        """Tokens in the cache."""
        ...

    def forward(self, ids: Sequence[int], last_only: bool = True) -> np.ndarray:
        """Append `ids` and return their logits: (1, V) if last_only else (len(ids), V), float32."""
        ...

    def rollback(self, n: int) -> None:
        """Forget the last n tokens."""
        ...

    def reset(self) -> None:
        """Forget every token."""
        ...
