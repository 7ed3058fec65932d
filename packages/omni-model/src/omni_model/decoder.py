"""The decoder: token embedding, a stack of blocks, final norm and LM head.

`forward(input_ids, cache=None)` returns float logits (B, T, V). With a cache, the new tokens sit at
positions cache.seq_len.. and the cache is advanced by T once every layer has written to it, so one
full forward and token-by-token decoding give the same logits. Models with MTP modules also give
their logits (`forward_mtp`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from omni_kv import (
    DenseKVCache,
    KVCache,
    KVCacheError,
    LatentKVCache,
    PagedKVCache,
    QuantizedKVCache,
    SinkWindowKVCache,
)
from omni_kv.quantized import QuantizedLatentKVCache
from omni_kv.spec import CacheSpec
from omni_kv.window import SinkWindowLatentKVCache
from omni_model.block import Block
from omni_model.config import ModelConfig
from omni_model.layers import Embedding, Linear, RMSNorm
from omni_model.mla import MLAttention, Mode
from omni_model.mtp import MTPModule
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
        self.mtp = nn.ModuleList(MTPModule(cfg, k) for k in range(cfg.mtp_depth))
        # Tables cover the trained context; they grow on demand beyond it.
        self._windows = [cfg.window_of(i) for i in range(cfg.n_layers)]  # per layer; None = full attention
        self.rope = Rope(cfg.rope, cfg.rope_dim, min(cfg.max_seq_len, 8192))
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
        self, batch_size: int = 1, max_len: int | None = None, dtype: torch.dtype | None = None,
        spec: CacheSpec | None = None,
    ) -> KVCache:  # fmt: skip
        """A cache sized for this model (grows on demand when max_len is None), of the kind `spec`
        names (dense by default): keys and values per kv head, or latents for latent attention."""
        cfg, spec = self.config, spec or CacheSpec()
        device = self.embed_tokens.weight.device
        if spec.kind == "dense" and dtype is None and spec.dtype == "float16":
            dtype = torch.float16
        dtype = dtype or self.embed_tokens.weight.dtype
        if cfg.mla is not None:
            rank, rope = cfg.mla.kv_lora_rank, cfg.mla.qk_rope_head_dim
            if spec.kind == "dense":
                return LatentKVCache(cfg.n_layers, rank, rope, batch_size=batch_size, max_len=max_len, dtype=dtype,
                                     device=device)  # fmt: skip
            if spec.kind in ("int8", "kivi", "nf4"):
                return QuantizedLatentKVCache(cfg.n_layers, rank, rope, spec.quant_config(), batch_size=batch_size,
                                              max_len=max_len, device=device)  # fmt: skip
            if spec.kind in ("sink", "window"):
                return SinkWindowLatentKVCache(
                    cfg.n_layers, rank, rope, sinks=spec.sinks if spec.kind == "sink" else 0, window=spec.window,
                    rotate=self.rope.shift, batch_size=batch_size, dtype=dtype, device=device,
                )  # fmt: skip
            # paged: the latent as the keys, the rotary key as the values (neither is rotated by the cache)
            return PagedKVCache(cfg.n_layers, 1, rank, v_head_dim=rope, batch_size=batch_size, dtype=dtype,
                                budget_bytes=spec.budget_bytes, page_tokens=spec.page_tokens,
                                spill_dir=spec.spill_dir)  # fmt: skip
        dims = (cfg.n_layers, cfg.n_kv_heads, cfg.head_size)
        if spec.kind == "dense":
            return DenseKVCache(*dims, batch_size=batch_size, max_len=max_len, dtype=dtype, device=device)
        if spec.kind in ("int8", "kivi", "nf4"):
            return QuantizedKVCache(*dims, spec.quant_config(), batch_size=batch_size, max_len=max_len, device=device,
                                    calibration=spec.load_calibration())  # fmt: skip
        if spec.kind == "paged":
            if str(device) != "cpu":
                raise KVCacheError("the paged cache lives in CPU memory; this model is on " + str(device))
            return PagedKVCache(*dims, batch_size=batch_size, dtype=dtype, budget_bytes=spec.budget_bytes,
                                page_tokens=spec.page_tokens, spill_dir=spec.spill_dir)  # fmt: skip
        if any(w is not None for w in self._windows):
            raise KVCacheError(f"a {spec.kind} cache cannot serve a model with sliding-window layers")
        if spec.dtype == "float16":
            dtype = torch.float16
        sinks = spec.sinks if spec.kind == "sink" else 0
        return SinkWindowKVCache(*dims, sinks=sinks, window=spec.window, rotate=self.rope.shift,
                                 batch_size=batch_size, dtype=dtype, device=device)  # fmt: skip

    def forward(self, input_ids: Tensor, cache: KVCache | None = None, last_only: bool = False) -> Tensor:
        return self.logits(self.hidden_states(input_ids, cache), last_only)

    def hidden_states(
        self,
        input_ids: Tensor,
        cache: KVCache | None = None,
        tree: Tensor | None = None,
        embeds: Tensor | None = None,
    ) -> Tensor:
        """Final-normed hidden states (B, T, D). `tree` (T,) int: the new tokens form a tree instead of a
        sequence (speculative decoding's candidates): tree[0] = -1 is the root, at the next position;
        tree[i] < i is token i's parent. Each token sits one position after its parent and attends to
        the cache and its ancestors only, so every root-to-leaf path computes what that sequence would.
        `embeds` (B, T, D): the input embeddings to use instead of looking up `input_ids` (multimodal
        inputs, where media features replace placeholder tokens; see omni_model.multimodal)."""
        t = input_ids.shape[1]
        start = cache.seq_len if cache is not None else 0
        if tree is None:
            cos, sin = self.rope(start, t)
            masks = self._masks(start, t, input_ids.device, cache.kv_length(t) if cache is not None else t)
        else:
            cos, sin, masks = self._tree(tree, start, t, cache, input_ids.device)
        x = self.embed_tokens(input_ids) if embeds is None else embeds  # (B, T, D)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, masks[self._windows[i]])
        if cache is not None:
            cache.advance(t)
        return self.norm(x)

    def forward_mtp(self, input_ids: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Main logits (B, T, V) and, per MTP module k = 1..D, logits (B, T-k, V) whose row i
        predicts token i+k+1 (the last row: a token past the input, a draft). A whole-sequence
        forward (training, evaluation); no cache."""
        h = main = self.hidden_states(input_ids)
        emb = self.embed_tokens(input_ids)
        t = input_ids.shape[1]
        out = []
        for k, module in enumerate(self.mtp, start=1):
            n = t - k
            if n <= 0:
                break
            cos, sin = self.rope(k, n)  # module k sees token i+k at position i+k
            h = module.predict(h[:, :n], emb[:, k:], cos, sin)
            out.append(self.logits(h))
        return self.logits(main), out

    def logits(self, h: Tensor, last_only: bool = False) -> Tensor:
        if last_only:
            h = h[:, -1:]
        return self.lm_head(h).float()

    def set_attention_mode(self, mode: Mode) -> None:
        """Latent attention's execution path for every layer: "naive", "absorbed" or "auto"."""
        if mode not in ("auto", "naive", "absorbed"):
            raise ValueError(f"mode must be 'auto', 'naive' or 'absorbed', got {mode!r}")
        for m in self.modules():
            if isinstance(m, MLAttention):
                m.mode = mode

    def _tree(self, tree: Tensor, start: int, t: int, cache: KVCache | None, device: torch.device) -> tuple[Tensor, Tensor, dict[int | None, Tensor | None]]:  # fmt: skip
        """Rotary tables at each token's depth and the ancestor mask of a token tree (see hidden_states)."""
        parents = [int(p) for p in tree.tolist()]
        if len(parents) != t or parents[0] != -1 or any(not 0 <= p < i for i, p in enumerate(parents) if i):
            raise ValueError(
                f"tree must give the root -1 and every later token a parent before it; got {parents}"
            )
        if any(w is not None for w in self._windows):
            raise KVCacheError("tree verification is not supported with sliding-window layers")
        if cache is not None and cache.kv_length(t) != start + t:
            raise KVCacheError("tree verification needs a cache that keeps every token (not sink or window)")
        depth = [0] * t
        seen = torch.zeros(t, t, dtype=torch.bool)
        for i, p in enumerate(parents):
            if p >= 0:
                depth[i] = depth[p] + 1
                seen[i] = seen[p]
            seen[i, i] = True
        cos, sin = self.rope(start, max(depth) + 1)
        idx = torch.tensor(depth, device=cos.device)
        mask = torch.cat([torch.ones(t, start, dtype=torch.bool), seen], dim=1).to(device)
        return cos[idx], sin[idx], {w: mask for w in set(self._windows)}

    def _masks(self, start: int, t: int, device: torch.device, s: int) -> dict[int | None, Tensor | None]:
        """Boolean attention masks (T, S), True = attend, keyed by window (None = full attention).
        S keys: the cache's (start + t, fewer when tokens have left it), the new ones last.

        None stands for "no mask needed": plain causal from position 0 (is_causal) or one token that
        sees everything before it.
        """
        start = s - t  # positions as the keys see them
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
