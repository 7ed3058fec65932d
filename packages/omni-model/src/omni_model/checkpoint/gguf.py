"""GGUF files: llama.cpp's tensor names and metadata mapped onto our modules and ModelConfig.

This module holds the one rename table of the package (GGUF's `blk.N.attn_q` -> `layers.N.self_attn.
q_proj`). llama.cpp's converter permutes the rows of Llama's q/k projections for its interleaved
RoPE; they are permuted back here to the half-split layout of Hugging Face checkpoints. Every tensor
type the `gguf` package can dequantize (F32, F16, BF16, Q8_0, Q4_0, Q4_1, K-quants, ...) loads.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from omni_model.checkpoint.gguf_file import GGUFFile
from omni_model.config import ModelConfig, RopeConfig
from omni_model.errors import CheckpointError, ConfigError, UnsupportedArchitectureError

ARCHITECTURES = {"llama", "mistral", "qwen2", "qwen3"}
PERMUTED_QK = {"llama", "mistral"}  # archs whose q/k llama.cpp stores in the interleaved RoPE layout

_GLOBAL = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
           "output.weight": "lm_head.weight"}  # fmt: skip
_BLOCK = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}  # fmt: skip
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def config_from_gguf(g: GGUFFile) -> ModelConfig:
    arch = g.architecture
    if arch not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{g.path}: architecture {arch!r} is not supported (supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    m = g.metadata
    if isinstance(m.get(f"{arch}.attention.head_count"), list):
        raise UnsupportedArchitectureError(f"{g.path}: per-layer head counts are not supported")
    if "rope_freqs.weight" in g.tensors:
        raise UnsupportedArchitectureError(
            f"{g.path}: per-frequency RoPE factors (rope_freqs) are not supported"
        )

    def get(key: str, default: Any = None, required: bool = True) -> Any:
        return _number(g, f"{arch}.{key}", default, required)

    n_heads = get("attention.head_count")
    tokens = m.get("tokenizer.ggml.tokens")
    vocab = get("vocab_size", required=False) or (len(tokens) if isinstance(tokens, list) else 0)
    if not vocab:
        emb = g.tensors.get("token_embd.weight")
        vocab = int(emb.shape[1]) if emb is not None and len(emb.shape) == 2 else 0
    head_dim = get("attention.key_length", required=False) or get("rope.dimension_count", required=False)
    try:
        return ModelConfig(
            vocab_size=int(vocab),
            dim=int(get("embedding_length")),
            n_layers=int(get("block_count")),
            n_heads=int(n_heads),
            n_kv_heads=int(get("attention.head_count_kv", n_heads)),
            ffn_dim=int(get("feed_forward_length")),
            head_dim=int(head_dim) if head_dim else None,
            norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            max_seq_len=int(get("context_length", 2048)),
            rope=_rope(g, arch),
            tie_embeddings="output.weight" not in g.tensors,
            qkv_bias="blk.0.attn_q.bias" in g.tensors,
            qk_norm="blk.0.attn_q_norm.weight" in g.tensors,
            sliding_window=int(get("attention.sliding_window", required=False) or 0) or None,
            bos_token_id=m.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=m.get("tokenizer.ggml.eos_token_id"),
        )
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise ConfigError(f"{g.path}: {e}") from None
        raise CheckpointError(f"{g.path}: malformed model metadata: {e}") from None


def _number(g: GGUFFile, key: str, default: Any = None, required: bool = True) -> int | float | None:
    """A numeric metadata value; anything else (a string, a list, NaN, infinity) is a CheckpointError naming `key`."""
    v = g.metadata.get(key, default)
    if v is None:
        if required:
            raise CheckpointError(f"{g.path}: metadata {key} is missing")
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise CheckpointError(f"{g.path}: metadata {key} = {repr(v)[:40]} is not a finite number")
    return v


def _rope(g: GGUFFile, arch: str) -> RopeConfig:
    m = g.metadata
    theta = float(_number(g, f"{arch}.rope.freq_base", 10000.0))
    kind = m.get(f"{arch}.rope.scaling.type", "none")
    factor = _number(g, f"{arch}.rope.scaling.factor", required=False) or 1.0
    original = _number(g, f"{arch}.rope.scaling.original_context_length", required=False)
    if kind in ("none", None) or factor == 1.0:
        return RopeConfig(theta=theta)
    if kind == "linear":
        return RopeConfig(theta=theta, type="linear", factor=float(factor))
    if kind == "yarn":
        return RopeConfig(theta=theta, type="yarn", factor=float(factor), original_max_position=original)
    raise UnsupportedArchitectureError(f"{g.path}: rope scaling {kind!r} is not supported")


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: interleaved pairs back to the half-split layout."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_target(g: GGUFFile, cfg: ModelConfig, name: str) -> tuple[str, int | None]:
    """Our module name for GGUF tensor `name`, and the head count to un-permute its rows by (q/k of
    llama-style files) or None."""
    if name in _GLOBAL:
        return _GLOBAL[name], None
    match = _BLOCK_RE.match(name)
    if match is None or match.group(2) not in _BLOCK:
        raise CheckpointError(f"{g.path}: unexpected tensor {name!r}")
    layer, part, kind = match.groups()
    heads = None
    if g.architecture in PERMUTED_QK and part in ("attn_q", "attn_k"):
        heads = cfg.n_heads if part == "attn_q" else cfg.n_kv_heads
        rows = int(g.tensors[name].shape[-1]) if len(g.tensors[name].shape) > 1 else 0
        if rows % (2 * heads):
            raise CheckpointError(f"{g.path}: tensor {name!r} with {rows} rows does not fit {heads} heads")
    return f"layers.{layer}.{_BLOCK[part]}.{kind}", heads


def unpermute_rows(rows: int, n_heads: int) -> list[int]:
    """The row order that undoes llama.cpp's q/k permutation (interleaved pairs -> half-split)."""
    idx = torch.arange(rows)
    return _unpermute(idx, n_heads).tolist()


def gguf_state_dict(g: GGUFFile, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Dequantized float32 weights keyed by our module names."""
    out: dict[str, torch.Tensor] = {}
    for name in g.tensors:
        ours, heads = gguf_target(g, cfg, name)
        t = g.tensor(name)
        out[ours] = t if heads is None else _unpermute(t, heads)
    return out
