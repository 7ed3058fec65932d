"""Hugging Face folders: `config.json` plus safetensors weights, sharded or not.

Llama, Mistral, Qwen2, Qwen3 and SmolLM (a Llama) map onto one `ModelConfig`. Both spellings of the
RoPE settings are read: `rope_theta` + `rope_scaling` (transformers 4) and `rope_parameters` (5).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

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
}
MOE_FAMILIES = {"mixtral", "qwen2_moe", "qwen3_moe"}
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
            raise ConfigError(f"{key} must be a JSON object, got {_short(value)}")
    params = {**scaling, **params}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    theta = _positive({"rope_theta": theta}, "rope_theta", float)
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
            raise ConfigError(f"{where} field {theirs} must be a number, got {_short(value)}")
        kw[ours] = value
    if kind in ("yarn", "dynamic") and "original_max_position" not in kw:
        kw["original_max_position"] = hf.get("max_position_embeddings")
    return RopeConfig(**kw)


_REQUIRED = object()
_MAX_LISTED_LAYERS = 2**16  # far beyond any real checkpoint


def _positive(hf: dict[str, Any], key: str, kind: type = int, default: Any = _REQUIRED) -> Any:
    """hf[key] as a positive int (or finite float); None passes when it is the default."""
    value = hf.get(key, default)
    if value is _REQUIRED:
        raise ConfigError(f"config.json lacks the field {key!r}")
    if value is None and default is None:
        return None
    ok = not isinstance(value, bool) and isinstance(value, int if kind is int else int | float)
    if ok and kind is float:
        try:
            ok = math.isfinite(float(value))
        except OverflowError:  # an int beyond float range
            ok = False
    if not ok or not value > 0:
        what = "integer" if kind is int else "finite number"
        raise ConfigError(f"{key} must be a positive {what}, got {_short(value)}")
    return kind(value)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Map a transformers config.json dict onto ModelConfig; a bad field is a ConfigError naming it."""
    kind = hf.get("model_type")
    if not isinstance(kind, str) or kind not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"model_type {_short(kind)} is not supported (supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    n_heads = _positive(hf, "num_attention_heads")
    n_layers = _positive(hf, "num_hidden_layers")
    try:
        window = hf.get("sliding_window")
        if kind in QWEN and not hf.get("use_sliding_window", False):
            window = None
        window = _positive({"sliding_window": window}, "sliding_window", default=None)
        sliding_layers = None
        layer_types = hf.get("layer_types")
        if window is not None and layer_types is not None:
            sliding_layers = tuple(i for i, t in enumerate(layer_types) if t == "sliding_attention")
        elif window is not None and kind in QWEN:
            first = hf.get("max_window_layers", n_layers)
            if n_layers > _MAX_LISTED_LAYERS:  # the tuple below would take memory and time per layer
                raise ConfigError(
                    f"num_hidden_layers must be at most {_MAX_LISTED_LAYERS:,}, got {n_layers:,}"
                )
            sliding_layers = tuple(range(first, n_layers))
        return ModelConfig(
            vocab_size=_positive(hf, "vocab_size"),
            dim=_positive(hf, "hidden_size"),
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=_positive(hf, "num_key_value_heads", default=None) or n_heads,
            ffn_dim=_positive(hf, "intermediate_size"),
            head_dim=_positive(hf, "head_dim", default=None),
            norm_eps=_positive(hf, "rms_norm_eps", float, 1e-6),
            max_seq_len=_positive(hf, "max_position_embeddings", default=2048),
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


def moe_from_hf(hf: dict[str, Any], kind: str) -> MoEConfig | None:
    """The MoE settings of Mixtral, Qwen2-MoE and Qwen3-MoE configs (None for dense families)."""
    if kind not in MOE_FAMILIES:
        return None
    if kind != "mixtral" and (hf.get("decoder_sparse_step", 1) != 1 or hf.get("mlp_only_layers")):
        raise UnsupportedArchitectureError(
            "dense layers among MoE ones (decoder_sparse_step, mlp_only_layers)"
        )
    # transformers 5 stores Qwen3-MoE's num_experts as num_local_experts (an attribute_map alias).
    n_experts = _positive(hf, "num_local_experts" if "num_local_experts" in hf else "num_experts")
    shared = kind == "qwen2_moe" and _positive(hf, "shared_expert_intermediate_size", default=0) > 0
    try:
        return MoEConfig(
            n_experts=n_experts,
            top_k=_positive(hf, "num_experts_per_tok"),
            expert_dim=_positive(hf, "intermediate_size" if kind == "mixtral" else "moe_intermediate_size"),
            norm_topk_prob=kind == "mixtral" or bool(hf.get("norm_topk_prob", False)),
            n_shared_experts=1 if shared else 0,
            shared_expert_dim=hf["shared_expert_intermediate_size"] if shared else None,
            shared_expert_gate=shared,
        )
    except MoEConfigError as e:
        raise ConfigError(str(e)) from None


def convert_moe_weights(
    state: dict[str, torch.Tensor], cfg: ModelConfig, kind: str
) -> dict[str, torch.Tensor]:
    """Stack the per-expert tensors of each MoE layer into omni_moe's layout (`layers.N.mlp.*`)."""
    if kind not in MOE_FAMILIES:
        return state
    block = "block_sparse_moe" if kind == "mixtral" else "mlp"
    out: dict[str, torch.Tensor] = {}
    per_layer: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in state.items():
        m = _MOE_KEY.match(name)
        if m and m.group(2) == block and cfg.is_moe_layer(int(m.group(1))):
            per_layer.setdefault(int(m.group(1)), {})[m.group(3)] = t
        else:
            out[name] = t
    for layer, sub in per_layer.items():
        try:
            converted = convert_hf_state_dict(sub, kind)  # type: ignore[arg-type]
        except HFConversionError as e:
            raise CheckpointError(f"layer {layer}: {e}") from None
        out.update({f"layers.{layer}.mlp.{k}": v for k, v in converted.items()})
    return out


_MOE_KEY = re.compile(r"^layers\.(\d+)\.(block_sparse_moe|mlp)\.(.+)$")


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
                raise CheckpointError(f"{index}: weight_map holds {_short(name)}, not a shard file name")
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
