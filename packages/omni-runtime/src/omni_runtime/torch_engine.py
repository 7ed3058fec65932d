"""The PyTorch engine: an omni_model decoder (fused or plain) behind the Engine protocol."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from omni_kv import CacheSpec
from omni_model.loader import LoadedModel
from omni_runtime.engine import EngineError


class TorchEngine:
    name = "torch"

    def __init__(
        self, lm: LoadedModel, *, max_seq_len: int | None = None, cache: CacheSpec | None = None
    ) -> None:
        """`cache`: the KV cache kind (omni_kv.CacheSpec; dense by default). A sink + window cache
        lets generation run past the model's context, so max_seq_len does not cap it."""
        self.lm, self.model = lm, lm.model
        self.vocab_size, self.hidden_size = lm.config.vocab_size, lm.config.dim
        self.max_seq_len = min(max_seq_len or lm.config.max_seq_len, lm.config.max_seq_len)
        if cache is not None and cache.kind in ("sink", "window"):
            self.max_seq_len = max_seq_len or 1 << 30
        # A growing cache: memory follows the sequence, not the model's (often long) context.
        self._cache = self.model.make_cache(batch_size=1, spec=cache)

    @property
    def seq_len(self) -> int:
        return self._cache.seq_len

    def _check(self, ids: Sequence[int]) -> None:
        n = len(ids)
        if n == 0:
            raise EngineError("forward needs at least one token")
        if self.seq_len + n > self.max_seq_len:
            raise EngineError(
                f"{self.seq_len + n} tokens exceed the engine's max_seq_len of {self.max_seq_len}"
            )
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise EngineError(f"token ids must be in 0..{self.vocab_size - 1}")

    @torch.inference_mode()
    def forward(self, ids: Sequence[int], last_only: bool = True) -> np.ndarray:
        self._check(ids)
        x = torch.tensor([list(ids)], dtype=torch.long)
        return self.model(x, cache=self._cache, last_only=last_only)[0].numpy()

    @torch.inference_mode()
    def forward_hidden(self, ids: Sequence[int], last_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Append `ids`; return their logits (T, V) and final-normed hidden states (T, D), or the last
        position's (1, V) and (1, D) with `last_only`."""
        self._check(ids)
        h = self.model.hidden_states(torch.tensor([list(ids)], dtype=torch.long), cache=self._cache)
        if last_only:
            h = h[:, -1:]
        return self.model.logits(h)[0].numpy(), h[0].float().numpy()

    @torch.inference_mode()
    def forward_tree(self, ids: Sequence[int], parents: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Append a token tree (parents[0] = -1, parents[i] < i; omni_model's Decoder.hidden_states) in one
        forward; return each token's logits (T, V) and hidden state (T, D). The tokens take the cache's next
        T slots: roll them back after verification."""
        self._check(ids)
        tree = torch.tensor(list(parents), dtype=torch.long)
        try:
            h = self.model.hidden_states(
                torch.tensor([list(ids)], dtype=torch.long), cache=self._cache, tree=tree
            )
        except ValueError as e:
            raise EngineError(str(e)) from None
        return self.model.logits(h)[0].numpy(), h[0].float().numpy()

    @torch.inference_mode()  # caches may write on rollback and reset (buffers made under inference mode)
    def rollback(self, n: int) -> None:
        if not 0 <= n <= self.seq_len:
            raise EngineError(f"cannot roll back {n} tokens; the cache holds {self.seq_len}")
        self._cache.rollback(n)

    @torch.inference_mode()
    def reset(self) -> None:
        self._cache.reset()
