"""MoEConfig validation names the offending field; dense/MoE layer placement."""

import pytest

from omni_moe import MoEConfig, MoEConfigError

BASE = {"n_experts": 8, "top_k": 2, "expert_dim": 16}


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"top_k": 9}, "top_k"),
        ({"n_experts": 0}, "n_experts"),
        ({"expert_dim": 0}, "expert_dim"),
        ({"n_group": 3}, "n_group"),
        ({"n_group": 2, "topk_group": 3}, "topk_group"),
        ({"n_group": 8, "topk_group": 1}, "n_group"),
        ({"n_group": 4, "topk_group": 1, "top_k": 3}, "top_k"),
        ({"router": "relu"}, "router"),
        ({"routed_scaling_factor": 0.0}, "routed_scaling_factor"),
        ({"sinkhorn_iters": -1}, "sinkhorn_iters"),
        ({"shared_expert_dim": 32}, "shared_expert_dim"),
        ({"shared_expert_gate": True}, "shared_expert_gate"),
        ({"moe_layer_freq": 0}, "moe_layer_freq"),
        ({"first_k_dense_replace": -1}, "first_k_dense_replace"),
    ],
)
def test_invalid_field_is_named(overrides: dict, field: str) -> None:
    with pytest.raises(MoEConfigError, match=field):
        MoEConfig(**{**BASE, **overrides})


def test_config_error_is_value_error() -> None:
    assert issubclass(MoEConfigError, ValueError)


def test_shared_dim_defaults_to_expert_dim_times_count() -> None:
    assert MoEConfig(**BASE, n_shared_experts=2).shared_dim == 32
    assert MoEConfig(**BASE, n_shared_experts=1, shared_expert_dim=40).shared_dim == 40
    assert MoEConfig(**BASE).shared_dim == 0


def test_is_moe_layer() -> None:
    cfg = MoEConfig(**BASE, first_k_dense_replace=3, moe_layer_freq=2)
    assert [cfg.is_moe_layer(i) for i in range(8)] == [False, False, False, False, True, False, True, False]
    assert all(MoEConfig(**BASE).is_moe_layer(i) for i in range(4))
