"""Hugging Face folders: `config.json` plus safetensors weights, sharded or not.

Llama, Mistral, Qwen2, Qwen3, SmolLM (a Llama), Mixtral, Qwen2-MoE, Qwen3-MoE and DeepSeek-V3
(omni_model.checkpoint.deepseek) map onto one `ModelConfig`. Both spellings of the RoPE settings
are read: `rope_theta` + `rope_scaling` (transformers 4) and `rope_parameters` (5).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from omni_model.checkpoint import deepseek
from omni_model.checkpoint.fields import MAX_LISTED_LAYERS, positive, short
from omni_model.config import ModelConfig, RopeConfig
from omni_model.errors import CheckpointError, ConfigError, UnsupportedArchitectureError
from omni_moe import MoEConfig, MoEConfigError
from omni_moe.hf import HFConversionError, convert_hf_state_dict

ARCHITECTURES = {
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "smollm",
    "smollm2",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "deepseek_v3",
}
MOE_FAMILIES = {"mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"}
QWEN = {"qwen2", "qwen3", "qwen2_moe", "qwen3_moe"}
INDEX = "model.safetensors.index.json"


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: not readable JSON: {e}") from None
    except RecursionError:
        raise CheckpointError(f"{path}: not readable JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def rope_from_hf(hf: dict[str, Any]) -> RopeConfig:
    params, scaling = hf.get("rope_parameters") or {}, hf.get("rope_scaling") or {}
    for key, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a JSON object, got {short(value)}")
    params = {**scaling, **params}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    theta = positive({"rope_theta": theta}, "rope_theta", float)
    kind = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UnsupportedArchitectureError(
            "partial rotary embeddings (partial_rotary_factor != 1) are not supported"
        )
    if kind not in ("default", "linear", "dynamic", "yarn", "llama3"):
        raise UnsupportedArchitectureError(f"rope type {kind!r} is not supported")
    kw: dict[str, Any] = {"theta": theta, "type": kind}
    for ours, theirs in [
        ("factor", "factor"), ("low_freq_factor", "low_freq_factor"), ("high_freq_factor", "high_freq_factor"),
        ("original_max_position", "original_max_position_embeddings"), ("beta_fast", "beta_fast"),
        ("beta_slow", "beta_slow"), ("attention_factor", "attention_factor"), ("mscale", "mscale"),
        ("mscale_all_dim", "mscale_all_dim"), ("truncate", "truncate"),
    ]:  # fmt: skip
        value = params.get(theirs)
        if value is None:
            continue
        if theirs != "truncate" and (isinstance(value, bool) or not isinstance(value, int | float)):
            where = "rope_parameters" if theirs in (hf.get("rope_parameters") or {}) else "rope_scaling"
            raise ConfigError(f"{where} field {theirs} must be a number, got {short(value)}")
        kw[ours] = value
    if kind in ("yarn", "dynamic") and "original_max_position" not in kw:
        kw["original_max_position"] = hf.get("max_position_embeddings")
    return RopeConfig(**kw)


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Map a transformers config.json dict onto ModelConfig; a bad field is a ConfigError naming it."""
    kind = hf.get("model_type")
    if not isinstance(kind, str) or kind not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"model_type {short(kind)} is not supported (supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    n_heads = positive(hf, "num_attention_heads")
    n_layers = positive(hf, "num_hidden_layers")
    try:
        window = hf.get("sliding_window")
        if kind in QWEN and not hf.get("use_sliding_window", False):
            window = None
        window = positive({"sliding_window": window}, "sliding_window", default=None)
        sliding_layers = None
        layer_types = hf.get("layer_types")
        if window is not None and layer_types is not None:
            sliding_layers = tuple(i for i, t in enumerate(layer_types) if t == "sliding_attention")
        elif window is not None and kind in QWEN:
            first = hf.get("max_window_layers", n_layers)
            if n_layers > MAX_LISTED_LAYERS:  # the tuple below would take memory and time per layer
                raise ConfigError(
                    f"num_hidden_layers must be at most {MAX_LISTED_LAYERS:,}, got {n_layers:,}"
                )
            sliding_layers = tuple(range(first, n_layers))
        if kind == "deepseek_v3":
            return _deepseek_config(hf, n_layers, n_heads)
        return ModelConfig(
            vocab_size=positive(hf, "vocab_size"),
            dim=positive(hf, "hidden_size"),
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=positive(hf, "num_key_value_heads", default=None) or n_heads,
            ffn_dim=positive(hf, "intermediate_size"),
            head_dim=positive(hf, "head_dim", default=None),
            norm_eps=positive(hf, "rms_norm_eps", float, 1e-6),
            max_seq_len=positive(hf, "max_position_embeddings", default=2048),
            rope=rope_from_hf(hf),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=bool(hf.get("attention_bias", hf.get("qkv_bias", kind in ("qwen2", "qwen2_moe")))),
            qk_norm=kind in ("qwen3", "qwen3_moe"),
            sliding_window=window,
            sliding_layers=sliding_layers,
            bos_token_id=_token_id(hf.get("bos_token_id")),
            eos_token_id=_token_id(hf.get("eos_token_id")),
            moe=moe_from_hf(hf, kind),
        )
    except TypeError as e:
        raise ConfigError(f"config.json has a field of the wrong type: {e}") from None


def _deepseek_config(hf: dict[str, Any], n_layers: int, n_heads: int) -> ModelConfig:
    mla, rope = deepseek.mla_from_hf(hf), rope_from_hf(hf)
    return ModelConfig(
        vocab_size=positive(hf, "vocab_size"),
        dim=positive(hf, "hidden_size"),
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_heads,  # latent attention has no kv heads of its own
        ffn_dim=positive(hf, "intermediate_size"),
        head_dim=mla.qk_head_dim,
        norm_eps=positive(hf, "rms_norm_eps", float, 1e-6),
        max_seq_len=positive(hf, "max_position_embeddings", default=2048),
        rope=rope,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=bool(hf.get("attention_bias", False)),
        attention_scale=deepseek.softmax_scale(mla, rope),
        bos_token_id=_token_id(hf.get("bos_token_id")),
        eos_token_id=_token_id(hf.get("eos_token_id")),
        moe=deepseek.moe_from_hf(hf),
        mla=mla,
        mtp_depth=deepseek.mtp_depth_declared(hf),
    )


def convert_weights(
    state: dict[str, torch.Tensor], cfg: ModelConfig, hf: dict[str, Any]
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Checkpoint tensors -> our names and layouts; the config loses MTP modules the weights lack."""
    kind = hf["model_type"]
    if kind == "deepseek_v3":
        assert cfg.mla is not None  # config_from_hf sets it for deepseek_v3
        depth = deepseek.mtp_layers_present(state, cfg.n_layers, cfg.mtp_depth)
        if depth != cfg.mtp_depth:
            cfg = dataclasses.replace(cfg, mtp_depth=depth)
        interleaved = bool(hf.get("rope_interleave", True))
        state = deepseek.convert_weights(state, cfg.n_layers, depth, cfg.mla, cfg.n_heads, interleaved)
    return cfg, convert_moe_weights(state, cfg, kind)


def moe_from_hf(hf: dict[str, Any], kind: str) -> MoEConfig | None:
    """The MoE settings of Mixtral, Qwen2-MoE and Qwen3-MoE configs (None for dense families)."""
    if kind not in MOE_FAMILIES:
        return None
    dense_layers: tuple[int, ...] = ()
    if kind != "mixtral":
        dense_layers = _qwen_dense_layers(hf)
    # transformers 5 stores Qwen3-MoE's num_experts as num_local_experts (an attribute_map alias).
    n_experts = positive(hf, "num_local_experts" if "num_local_experts" in hf else "num_experts")
    shared = kind == "qwen2_moe" and positive(hf, "shared_expert_intermediate_size", default=0) > 0
    try:
        return MoEConfig(
            n_experts=n_experts,
            top_k=positive(hf, "num_experts_per_tok"),
            expert_dim=positive(hf, "intermediate_size" if kind == "mixtral" else "moe_intermediate_size"),
            norm_topk_prob=kind == "mixtral" or bool(hf.get("norm_topk_prob", False)),
            n_shared_experts=1 if shared else 0,
            shared_expert_dim=hf["shared_expert_intermediate_size"] if shared else None,
            shared_expert_gate=shared,
            dense_layers=dense_layers,
        )
    except MoEConfigError as e:
        raise ConfigError(str(e)) from None


def _qwen_dense_layers(hf: dict[str, Any]) -> tuple[int, ...]:
    """Qwen-MoE's dense layers: those in mlp_only_layers, and all but every decoder_sparse_step-th
    (layer i is sparse when (i + 1) % step == 0)."""
    n_layers = positive(hf, "num_hidden_layers")
    step = positive(hf, "decoder_sparse_step", default=1)
    only = hf.get("mlp_only_layers") or []
    if not isinstance(only, list) or any(not isinstance(i, int) or isinstance(i, bool) for i in only):
        raise ConfigError(f"mlp_only_layers must be a list of layer indices, got {short(only)}")
    bad = [i for i in only if not 0 <= i < n_layers]
    if bad:
        raise ConfigError(f"mlp_only_layers holds layer indices outside 0..{n_layers - 1}: {bad[:5]}")
    dense = set(only)
    if step == 1:
        return tuple(sorted(dense))
    if n_layers > MAX_LISTED_LAYERS:
        raise ConfigError(f"num_hidden_layers must be at most {MAX_LISTED_LAYERS:,}, got {n_layers:,}")
    return tuple(i for i in range(n_layers) if i in dense or (i + 1) % step)


def convert_moe_weights(
    state: dict[str, torch.Tensor], cfg: ModelConfig, kind: str
) -> dict[str, torch.Tensor]:
    """Stack the per-expert tensors of each MoE layer into omni_moe's layout (`layers.N.mlp.*`)."""
    if kind not in MOE_FAMILIES:
        return state
    block = "block_sparse_moe" if kind == "mixtral" else "mlp"
    out: dict[str, torch.Tensor] = {}
    per_layer: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in state.items():
        m = _MOE_KEY.match(name)
        # MTP modules (`mtp.k.`) always have an MoE feed-forward in MoE models.
        if m and m.group(3) == block and (m.group(1) == "mtp" or cfg.is_moe_layer(int(m.group(2)))):
            per_layer.setdefault(f"{m.group(1)}.{m.group(2)}", {})[m.group(4)] = t
        else:
            out[name] = t
    for prefix, sub in per_layer.items():
        try:
            converted = convert_hf_state_dict(sub, kind)  # type: ignore[arg-type]
        except HFConversionError as e:
            raise CheckpointError(f"{prefix.replace('layers.', 'layer ')}: {e}") from None
        out.update({f"{prefix}.mlp.{k}": v for k, v in converted.items()})
    return out


_MOE_KEY = re.compile(r"^(layers|mtp)\.(\d+)\.(block_sparse_moe|mlp)\.(.+)$")


def _token_id(v: Any) -> int | None:
    if isinstance(v, list):
        v = v[0] if v else None
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def weight_files(folder: Path) -> list[Path]:
    index = folder / INDEX
    if index.is_file():
        wm = read_json(index).get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise CheckpointError(f"{index}: has no weight_map")
        files = []
        for name in wm.values():
            if not isinstance(name, str) or not name or "\0" in name:
                raise CheckpointError(f"{index}: weight_map holds {short(name)}, not a shard file name")
            p = (folder / name).resolve()
            if folder.resolve() not in p.parents:
                raise CheckpointError(f"{index}: shard {name!r} lies outside the folder")
            files.append(p)
        return list(dict.fromkeys(files))
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        bins = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt*")]
        hint = f" (found {', '.join(bins)}: pickled weights are never loaded)" if bins else ""
        raise CheckpointError(f"{folder}: no safetensors weights{hint}")
    return files


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs from every file; any malformed file raises CheckpointError naming it."""
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f}: no such file")
        try:
            with safe_open(str(f), framework="pt") as sf:
                for name in sf.keys():  # noqa: SIM118 - safe_open has no __iter__
                    yield name, sf.get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError, OverflowError) as e:
            reason = " ".join(str(e).split())[:200] or type(e).__name__
            raise CheckpointError(f"{f}: not a readable safetensors file: {reason}") from None


def hf_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Weights keyed by our module names: `model.` prefixes dropped, nothing else renamed."""
    out = {}
    for name, t in iter_safetensors(weight_files(folder)):
        out[name.removeprefix("model.")] = t
    return out
