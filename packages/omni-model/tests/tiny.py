"""Tiny random checkpoints for tests: transformers models saved with save_pretrained, plus a
byte-level tokenizer.json, so `omni_model.load` sees exactly what a real Hugging Face folder holds."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

VOCAB = 320  # 256 byte tokens + a few merges' worth of headroom; ids >= 256 are plain unused rows


def byte_tokenizer(folder: Path) -> None:
    """A byte-level BPE with no merges: every byte one token, ids 0..255, plus <s> and </s>."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_map = {ch: i for i, ch in enumerate(sorted(alphabet))}
    byte_map["<s>"], byte_map["</s>"] = 256, 257
    tok = Tokenizer(models.BPE(vocab=byte_map, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.save(str(folder / "tokenizer.json"))


def save_tiny(kind: str, folder: Path, seed: int = 0, **overrides) -> torch.nn.Module:
    """Build, randomly initialise and save a tiny transformers model of `kind`; returns it in eval mode."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=256, eos_token_id=257)  # fmt: skip
    common.update(overrides)
    config_cls, model_cls = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
        "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM),
        "qwen2_moe": (tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM),
        "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM),
    }[kind]
    torch.manual_seed(seed)
    config = config_cls(**common)
    config._attn_implementation = "eager"
    model = model_cls(config).eval()
    with torch.no_grad():  # random, not the near-zero init, so that every weight matters for parity
        for p in model.parameters():
            p.normal_(0, 0.2 if p.ndim > 1 else 1.0)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    byte_tokenizer(folder)
    return model
