"""Parity with transformers' MoE blocks in float32: same weights, same inputs, max |diff| <= 1e-5."""

import pytest
import torch
from torch import nn

from omni_moe import HFConversionError, MoEConfig, MoELayer, convert_hf_state_dict, load_hf_state_dict

transformers = pytest.importorskip("transformers")
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # noqa: E402
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock  # noqa: E402

D, FFN, E, K = 32, 24, 8, 2


def randomise(block: nn.Module, seed: int) -> None:
    # std 0.2 rather than HF's 0.02 init so router logits differ enough that tokens spread over experts.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in [*block.parameters(), *block.buffers()]:
            t.copy_(torch.randn(t.shape, generator=g) * 0.2)


def check(hf_block: nn.Module, ours: MoELayer, family: str, seed: int = 0) -> None:
    randomise(hf_block, seed)
    hf_block.eval()
    ours.eval()
    load_hf_state_dict(ours, hf_block.state_dict(), family)
    x = torch.randn(3, 7, D, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        want = hf_block(x)
        got = ours(x)
    assert (ours.last_counts > 0).sum() >= 4, "routing collapsed; the test would not exercise dispatch"
    assert (got - want).abs().max().item() <= 1e-5


def test_mixtral() -> None:
    hf_cfg = transformers.MixtralConfig(
        hidden_size=D, intermediate_size=FFN, num_local_experts=E, num_experts_per_tok=K
    )
    cfg = MoEConfig(n_experts=E, top_k=K, expert_dim=FFN, router="softmax", norm_topk_prob=True)
    check(MixtralSparseMoeBlock(hf_cfg), MoELayer(D, cfg), "mixtral")


def test_qwen2_moe_gated_shared_expert() -> None:
    hf_cfg = transformers.Qwen2MoeConfig(
        hidden_size=D,
        moe_intermediate_size=FFN,
        shared_expert_intermediate_size=40,
        num_experts=E,
        num_experts_per_tok=K,
        norm_topk_prob=False,
    )
    cfg = MoEConfig(
        n_experts=E,
        top_k=K,
        expert_dim=FFN,
        norm_topk_prob=False,
        n_shared_experts=1,
        shared_expert_dim=40,
        shared_expert_gate=True,
    )
    check(Qwen2MoeSparseMoeBlock(hf_cfg), MoELayer(D, cfg), "qwen2_moe")


@pytest.mark.parametrize("norm", [True, False])
def test_qwen3_moe(norm: bool) -> None:
    hf_cfg = transformers.Qwen3MoeConfig(
        hidden_size=D, moe_intermediate_size=FFN, num_experts=E, num_experts_per_tok=K, norm_topk_prob=norm
    )
    cfg = MoEConfig(n_experts=E, top_k=K, expert_dim=FFN, norm_topk_prob=norm)
    check(Qwen3MoeSparseMoeBlock(hf_cfg), MoELayer(D, cfg), "qwen3_moe")


def test_deepseek_v3_grouped_biased_scaled_shared() -> None:
    hf_cfg = transformers.DeepseekV3Config(
        hidden_size=D,
        moe_intermediate_size=FFN,
        n_routed_experts=16,
        num_experts_per_tok=3,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        n_shared_experts=2,
        norm_topk_prob=True,
    )
    cfg = MoEConfig(
        n_experts=16,
        top_k=3,
        expert_dim=FFN,
        router="sigmoid",
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        score_correction_bias=True,
        n_shared_experts=2,
    )
    hf_block = DeepseekV3MoE(hf_cfg)
    check(hf_block, MoELayer(D, cfg), "deepseek_v3", seed=3)
    assert hf_block.gate.e_score_correction_bias.abs().min() > 0


def test_per_expert_checkpoint_layout_is_stacked() -> None:
    """On-disk Mixtral names (w1/w3/w2 per expert) load to the same layer as the fused layout."""
    hf_cfg = transformers.MixtralConfig(
        hidden_size=D, intermediate_size=FFN, num_local_experts=E, num_experts_per_tok=K
    )
    hf_block = MixtralSparseMoeBlock(hf_cfg)
    randomise(hf_block, 5)
    sd = hf_block.state_dict()
    gate_up, down = sd.pop("experts.gate_up_proj"), sd.pop("experts.down_proj")
    for i in range(E):
        sd[f"experts.{i}.w1.weight"] = gate_up[i, :FFN]
        sd[f"experts.{i}.w3.weight"] = gate_up[i, FFN:]
        sd[f"experts.{i}.w2.weight"] = down[i]
    ours = MoELayer(D, MoEConfig(n_experts=E, top_k=K, expert_dim=FFN))
    load_hf_state_dict(ours, sd, "mixtral")
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        assert (ours(x) - hf_block(x)).abs().max().item() <= 1e-5


def test_missing_projection_is_named() -> None:
    sd = {"experts.0.w1.weight": torch.zeros(FFN, D), "experts.0.w3.weight": torch.zeros(FFN, D)}
    with pytest.raises(HFConversionError, match="'w2'"):
        convert_hf_state_dict(sd, "mixtral")
