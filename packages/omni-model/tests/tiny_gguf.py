"""Tiny llama GGUF files for tests, written with `gguf.GGUFWriter` the way llama.cpp's converter does.

The vocabulary is a byte-level gpt2-type BPE (256 byte tokens in GPT-2 order, <s>, </s>, then merges),
so it is as big as `tiny.VOCAB` and a GGUF written from a `save_tiny("llama", ...)` model lines up
with it. llama.cpp stores Llama's q/k rows permuted for its interleaved RoPE; `permute_qk` does the
same here (convert_hf_to_gguf.py `LlamaModel.permute`).
"""

from __future__ import annotations

from itertools import product
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

from .tiny import VOCAB

# HF (transformers) names -> llama.cpp names, written out here rather than imported from the loader.
_HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_HF_BLOCK = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}  # fmt: skip
# The mixed-type tiny file: norms stay F32 (as llama.cpp keeps them); 2-D weights use each other type.
# Quantized rows must hold whole 32-element blocks, hence dim and ffn_dim multiples of 32.
MIXED_TYPES = {
    "token_embd": Q.F16, "output": Q.Q8_0, "attn_q": Q.Q8_0, "attn_k": Q.Q4_0, "attn_v": Q.F16,
    "attn_output": Q.Q8_0, "ffn_gate": Q.Q4_0, "ffn_up": Q.Q8_0, "ffn_down": Q.Q4_0,
}  # fmt: skip


def _byte_chars() -> list[str]:
    """GPT-2's byte -> printable character table, indexed by byte."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def byte_level_vocab(n_tokens: int = VOCAB) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges): bytes 0..255, <s> = 256, </s> = 257, then two-letter merges."""
    tokens = [*_byte_chars(), "<s>", "</s>"]
    types = [1] * 256 + [3, 3]  # 1 normal, 3 control (llama.cpp token types)
    letters = "etaoinshrdlucmfw"
    merges = [f"{a} {b}" for a, b in product(letters, letters)][: n_tokens - len(tokens)]
    tokens += [m.replace(" ", "") for m in merges]
    types += [1] * len(merges)
    return tokens, types, merges


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row order: each head's half-split rotary pairs interleaved."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(
    path: Path,
    tensors: dict[str, np.ndarray],
    *,
    dim: int,
    n_layers: int,
    n_heads: int,
    n_kv_heads: int,
    ffn_dim: int,
    arch: str = "llama",
    context_length: int = 128,
    rms_eps: float = 1e-6,
    rope_theta: float = 10000.0,
    types: dict[str, Q] | None = None,
    pre: str = "smollm",
) -> Path:
    """Write float32 `tensors` (llama.cpp names, PyTorch (out, in) order) and llama metadata to `path`."""
    w = gguf.GGUFWriter(path, arch)
    w.add_context_length(context_length)
    w.add_embedding_length(dim)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(ffn_dim)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_layer_norm_rms_eps(rms_eps)
    w.add_rope_freq_base(rope_theta)
    w.add_rope_dimension_count(dim // n_heads)
    tokens, token_types, merges = byte_level_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(merges)
    w.add_bos_token_id(256)
    w.add_eos_token_id(257)
    for name, t in tensors.items():
        kind = name.split(".")[-2]
        qtype = (types or {}).get(kind, Q.F32) if t.ndim == 2 else Q.F32
        if qtype in (Q.F32, Q.F16):
            w.add_tensor(name, gguf.quants.quantize(t.astype(np.float32), qtype))
        else:
            w.add_tensor(name, gguf.quants.quantize(t.astype(np.float32), qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def gguf_from_hf(model, path: Path) -> Path:
    """A float32 GGUF of a transformers LlamaForCausalLM, q/k permuted as llama.cpp stores them."""
    c = model.config
    tensors = {}
    for name, p in model.state_dict().items():
        t = p.detach().float().numpy()
        if name in _HF_TO_GGUF:
            tensors[_HF_TO_GGUF[name]] = t
            continue
        _, _, layer, rest = name.split(".", 3)  # model.layers.N.<module>.weight
        module, kind = rest.rsplit(".", 1)
        if module == "self_attn.q_proj":
            t = permute_qk(t, c.num_attention_heads)
        elif module == "self_attn.k_proj":
            t = permute_qk(t, c.num_key_value_heads)
        tensors[f"blk.{layer}.{_HF_BLOCK[module]}.{kind}"] = t
    theta = (getattr(c, "rope_parameters", None) or {}).get("rope_theta") or getattr(c, "rope_theta", 10000.0)
    return write_gguf(
        path, tensors, dim=c.hidden_size, n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads,
        n_kv_heads=c.num_key_value_heads, ffn_dim=c.intermediate_size,
        context_length=c.max_position_embeddings, rms_eps=c.rms_norm_eps, rope_theta=theta,
    )  # fmt: skip


def tiny_llama_gguf(
    path: Path, *, arch: str = "llama", dim: int = 32, n_layers: int = 1, ffn_dim: int = 64, seed: int = 0
) -> Path:
    """A random llama GGUF with F32, F16, Q8_0 and Q4_0 tensors: 2 heads, 1 kv head, `n_layers` blocks."""
    rng = np.random.default_rng(seed)
    n_heads, n_kv, head = 2, 1, dim // 2

    def randn(*shape: int) -> np.ndarray:
        return rng.normal(0.0, 0.2, shape).astype(np.float32)

    tensors = {"token_embd.weight": randn(VOCAB, dim), "output_norm.weight": 1 + randn(dim),
               "output.weight": randn(VOCAB, dim)}  # fmt: skip
    for i in range(n_layers):
        tensors |= {
            f"blk.{i}.attn_norm.weight": 1 + randn(dim), f"blk.{i}.ffn_norm.weight": 1 + randn(dim),
            f"blk.{i}.attn_q.weight": randn(n_heads * head, dim), f"blk.{i}.attn_k.weight": randn(n_kv * head, dim),
            f"blk.{i}.attn_v.weight": randn(n_kv * head, dim), f"blk.{i}.attn_output.weight": randn(dim, n_heads * head),
            f"blk.{i}.ffn_gate.weight": randn(ffn_dim, dim), f"blk.{i}.ffn_up.weight": randn(ffn_dim, dim),
            f"blk.{i}.ffn_down.weight": randn(dim, ffn_dim),
        }  # fmt: skip
    return write_gguf(
        path, tensors, arch=arch, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, ffn_dim=ffn_dim,
        context_length=64, types=MIXED_TYPES,
    )  # fmt: skip
