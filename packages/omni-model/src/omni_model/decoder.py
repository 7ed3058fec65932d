"""The decoder: token embedding, a stack of blocks, final norm and LM head.

`forward(input_ids, cache=None)` returns float logits (B, T, V). With a cache, the new tokens sit at
positions cache.seq_len.. and the cache is advanced by T once every layer has written to it, so one
full forward and token-by-token decoding give the same logits.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from omni_kv import DenseKVCache, KVCache
from omni_model.config import ModelConfig
from omni_model.layers import Block, Embedding, Linear, RMSNorm
from omni_model.rope import Rope


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig, *, init: bool = True) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # Tables cover the trained context; they grow on demand beyond it.
        self._windows = [cfg.window_of(i) for i in range(cfg.n_layers)]  # per layer; None = full attention
        self.rope = Rope(cfg.rope, cfg.head_size, min(cfg.max_seq_len, 8192))
        if init:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Random weights as Llama-family checkpoints are initialised: N(0, std), zero biases."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.zero_()

    def make_cache(
        self, batch_size: int = 1, max_len: int | None = None, dtype: torch.dtype | None = None
    ) -> DenseKVCache:
        """A dense cache sized for this model (grows on demand when max_len is None)."""
        cfg = self.config
        return DenseKVCache(
            cfg.n_layers, cfg.n_kv_heads, cfg.head_size, batch_size=batch_size, max_len=max_len,
            dtype=dtype or self.embed_tokens.weight.dtype, device=self.embed_tokens.weight.device,
        )  # fmt: skip

    def forward(self, input_ids: Tensor, cache: KVCache | None = None, last_only: bool = False) -> Tensor:
        return self.logits(self.hidden_states(input_ids, cache), last_only)

    def hidden_states(self, input_ids: Tensor, cache: KVCache | None = None) -> Tensor:
        """Final-normed hidden states (B, T, D)."""
        t = input_ids.shape[1]
        start = cache.seq_len if cache is not None else 0
        cos, sin = self.rope(start, t)
        masks = self._masks(start, t, input_ids.device)
        x = self.embed_tokens(input_ids)  # (B, T, D)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, masks[self._windows[i]])
        if cache is not None:
            cache.advance(t)
        return self.norm(x)

    def logits(self, h: Tensor, last_only: bool = False) -> Tensor:
        if last_only:
            h = h[:, -1:]
        return self.lm_head(h).float()

    def _masks(self, start: int, t: int, device: torch.device) -> dict[int | None, Tensor | None]:
        """Boolean attention masks (T, S), True = attend, keyed by window (None = full attention).

        None stands for "no mask needed": plain causal from position 0 (is_causal) or one token that
        sees everything before it.
        """
        s = start + t
        out: dict[int | None, Tensor | None] = {}
        q_pos = torch.arange(start, s, device=device)[:, None]  # (T, 1)
        k_pos = torch.arange(s, device=device)[None, :]  # (1, S)
        for w in set(self._windows):
            if (t == 1 or start == 0) and (w is None or s <= w):
                out[w] = None
                continue
            allowed = k_pos <= q_pos
            if w is not None:
                allowed = allowed & (k_pos > q_pos - w)
            out[w] = allowed
        return out
