"""Switch loss and z-loss against hand computations; the aux-loss-free bias update balances load."""

import math

import pytest
import torch

from omni_moe import MoEConfig, route, switch_loss, update_bias, z_loss


def test_switch_loss_hand_computed() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    indices = torch.tensor([[0], [1]])
    p = logits.softmax(-1).mean(0)  # P_e
    f = torch.tensor([0.5, 0.5, 0.0])  # f_e: each of 2 tokens sent to a different expert
    assert torch.isclose(switch_loss(logits, indices), 3 * (f * p).sum())


def test_switch_loss_matches_mixtral() -> None:
    modeling = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    logits = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))
    indices = logits.topk(2, -1).indices
    want = modeling.load_balancing_loss_func((logits,), num_experts=8, top_k=2)
    assert torch.isclose(switch_loss(logits, indices), want)


def test_switch_loss_is_one_when_balanced_uniform() -> None:
    logits = torch.zeros(8, 4)
    indices = torch.arange(8).remainder(4).unsqueeze(1)  # each expert gets 2 of 8 tokens
    assert torch.isclose(switch_loss(logits, indices), torch.tensor(1.0))


def test_z_loss_hand_computed() -> None:
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    want = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    assert z_loss(logits).item() == pytest.approx(want, rel=1e-6)


def test_update_bias_direction() -> None:
    bias = torch.zeros(4)
    update_bias(bias, torch.tensor([10, 2, 4, 4]), rate=0.1)  # mean load 5
    assert bias.tolist() == pytest.approx([-0.1, 0.1, 0.1, 0.1])


def test_repeated_bias_updates_balance_a_skewed_router() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2048, 8, generator=g) + torch.linspace(-2, 2, 8)  # favours high experts
    cfg = MoEConfig(n_experts=8, top_k=2, expert_dim=4, router="sigmoid", score_correction_bias=True)
    bias = torch.zeros(8)

    def ratio() -> tuple[float, torch.Tensor]:
        _, idx = route(logits, cfg, bias)
        counts = torch.bincount(idx.flatten(), minlength=8)
        return (counts.max() / counts.min().clamp(min=1)).item(), counts

    start, _ = ratio()
    for _ in range(200):
        _, counts = ratio()
        update_bias(bias, counts, rate=0.01)
    end, _ = ratio()
    assert start > 5
    assert end < 1.5
    assert bias[0] > bias[-1]  # the unpopular expert was pushed up, the popular one down
