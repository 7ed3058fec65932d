"""Hugging Face MoE weights -> MoELayer state dicts, for Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3.

Keys are relative to the MoE block (`block_sparse_moe.` / `mlp.` already stripped). Two layouts
are accepted: a transformers >= 5 module's fused `experts.gate_up_proj` / `experts.down_proj`
(our own layout, copied through), and the per-expert tensors that checkpoints on disk hold
(`experts.{i}.gate_proj/up_proj/down_proj.weight`; Mixtral `experts.{i}.w1/w3/w2.weight`), stacked.
"""

import re
from typing import Literal

import torch
from torch import Tensor

from omni_moe.layer import MoELayer

Family = Literal["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"]

# Per family: the on-disk names of an expert's (gate, up, down) projections.
_EXPERT_NAMES: dict[str, tuple[str, str, str]] = {
    "mixtral": ("w1", "w3", "w2"),
    "qwen2_moe": ("gate_proj", "up_proj", "down_proj"),
    "qwen3_moe": ("gate_proj", "up_proj", "down_proj"),
    "deepseek_v3": ("gate_proj", "up_proj", "down_proj"),
}
_PER_EXPERT = re.compile(r"^experts\.(\d+)\.(\w+)\.weight$")


class HFConversionError(ValueError):
    """A Hugging Face state dict does not have the keys its family should."""


def convert_hf_state_dict(state_dict: dict[str, Tensor], family: Family) -> dict[str, Tensor]:
    """Rename and stack an HF MoE block's tensors into MoELayer's names."""
    if family not in _EXPERT_NAMES:
        raise HFConversionError(f"family must be one of {sorted(_EXPERT_NAMES)}, got {family!r}")
    gate_name, up_name, down_name = _EXPERT_NAMES[family]
    out: dict[str, Tensor] = {}
    per_expert: dict[int, dict[str, Tensor]] = {}
    for key, value in state_dict.items():
        m = _PER_EXPERT.match(key)
        if m:
            per_expert.setdefault(int(m.group(1)), {})[m.group(2)] = value
        elif key.startswith("shared_expert."):  # Qwen2-MoE's singular name
            out["shared_experts." + key.removeprefix("shared_expert.")] = value
        else:
            out[key] = value
    if per_expert:
        n = len(per_expert)
        if sorted(per_expert) != list(range(n)):
            raise HFConversionError(f"expert indices are not 0..{n - 1}: {sorted(per_expert)}")
        try:
            gate_up = [torch.cat([per_expert[i][gate_name], per_expert[i][up_name]]) for i in range(n)]
            down = [per_expert[i][down_name] for i in range(n)]
        except KeyError as e:
            raise HFConversionError(f"{family} expert is missing projection {e.args[0]!r}") from None
        out["experts.gate_up_proj"] = torch.stack(gate_up)  # (E, 2I, D)
        out["experts.down_proj"] = torch.stack(down)  # (E, D, I)
    return out


def load_hf_state_dict(layer: MoELayer, state_dict: dict[str, Tensor], family: Family) -> None:
    """Load an HF MoE block's weights into layer, strictly (every key on both sides must match)."""
    layer.load_state_dict(convert_hf_state_dict(state_dict, family), strict=True)
