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
    if kind == "deepseek_v3":
        common.update(DEEPSEEK)
    common.update(overrides)
    config_cls, model_cls = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
        "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM),
        "qwen2_moe": (tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM),
        "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM),
        "deepseek_v3": (tf.DeepseekV3Config, tf.DeepseekV3ForCausalLM),
    }[kind]
    torch.manual_seed(seed)
    config = config_cls(**common)
    config._attn_implementation = "eager"
    model = model_cls(config).eval()
    with torch.no_grad():  # random, not the near-zero init, so that every weight matters for parity
        for p in model.parameters():
            p.normal_(0, 0.2 if p.ndim > 1 else 1.0)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # so that the bias changes which experts win
                b.normal_(0, 0.1)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    byte_tokenizer(folder)
    return model


# Small DeepSeek-V3: latent attention with a query low-rank, 2 expert groups, a dense first layer.
DEEPSEEK = dict(num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=24, qk_rope_head_dim=8,
                qk_nope_head_dim=16, v_head_dim=12, n_routed_experts=8, num_experts_per_tok=2,
                moe_intermediate_size=32, n_group=2, topk_group=1, n_shared_experts=1,
                first_k_dense_replace=1, routed_scaling_factor=2.5)  # fmt: skip


def save_tiny_mtp(model: torch.nn.Module, folder: Path, seed: int = 1) -> torch.nn.Module:
    """Random MTP modules for a saved DeepSeek-V3 `model`, written as DeepSeek's checkpoints store
    them (`model.layers.{N+k}.*`, per-expert weights, embedding and head copies) in mtp.safetensors.
    Returns transformers' MtpModel holding the same weights, the reference for parity."""
    from safetensors.torch import save_file
    from transformers.modeling_layers import MtpModel

    cfg = model.config
    mtp = MtpModel(model, cfg.num_mtp_layers).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in mtp.layers.parameters():  # not the embedding and head it shares with the model
            p.normal_(0, 0.2 if p.ndim > 1 else 1.0)
        for name, b in mtp.layers.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.1)
    n = cfg.num_hidden_layers
    out = {}
    for name, t in mtp.layers.state_dict().items():
        k, rest = name.split(".", 1)
        rest = rest.removeprefix("mtp_block.").replace("post_norm.", "shared_head.norm.")
        prefix = f"model.layers.{n + int(k)}."
        if rest.endswith("mlp.experts.gate_up_proj"):
            gate, up = t.chunk(2, dim=1)
            for e in range(t.shape[0]):
                out[f"{prefix}mlp.experts.{e}.gate_proj.weight"] = gate[e].contiguous()
                out[f"{prefix}mlp.experts.{e}.up_proj.weight"] = up[e].contiguous()
        elif rest.endswith("mlp.experts.down_proj"):
            for e in range(t.shape[0]):
                out[f"{prefix}mlp.experts.{e}.down_proj.weight"] = t[e].contiguous()
        else:
            out[prefix + rest] = t.contiguous()
    for k in range(cfg.num_mtp_layers):
        out[f"model.layers.{n + k}.embed_tokens.weight"] = model.model.embed_tokens.weight.detach().clone()
        out[f"model.layers.{n + k}.shared_head.head.weight"] = model.lm_head.weight.detach().clone()
    save_file(out, str(folder / "mtp.safetensors"))
    return mtp
