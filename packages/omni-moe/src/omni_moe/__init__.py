"""omni_moe: routers, stacked SwiGLU experts, sparse dispatch and load balancing for MoE decoders."""

from omni_moe.balance import switch_loss, update_bias, z_loss
from omni_moe.config import MoEConfig, MoEConfigError
from omni_moe.dispatch import dispatch
from omni_moe.experts import Experts, SwiGLU
from omni_moe.hf import HFConversionError, convert_hf_state_dict, load_hf_state_dict
from omni_moe.layer import MoELayer, MoEOutput
from omni_moe.router import Router, group_mask, route, sinkhorn
from omni_moe.upcycle import upcycle_config, upcycle_ffn

__all__ = [
    "Experts",
    "HFConversionError",
    "MoEConfig",
    "MoEConfigError",
    "MoELayer",
    "MoEOutput",
    "Router",
    "SwiGLU",
    "convert_hf_state_dict",
    "dispatch",
    "group_mask",
    "load_hf_state_dict",
    "route",
    "sinkhorn",
    "switch_loss",
    "upcycle_config",
    "upcycle_ffn",
    "update_bias",
    "z_loss",
]
