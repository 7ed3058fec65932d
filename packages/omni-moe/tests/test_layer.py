"""The MoE layer is sparse (empty experts never run) and equals a slow per-token reference."""

import torch
import torch.nn.functional as F

from omni_moe import MoEConfig, MoELayer

D = 16


def layer(cfg: MoEConfig, seed: int = 0) -> MoELayer:
    torch.manual_seed(seed)
    m = MoELayer(D, cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m.eval()


def slow_reference(m: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """Loop over tokens and their chosen experts, no grouping or scatter."""
    flat = x.reshape(-1, D)
    weights, indices, _ = m.gate(flat)
    ex = m.experts
    out = torch.zeros_like(flat)
    for n in range(flat.shape[0]):
        for w, e in zip(weights[n].tolist(), indices[n].tolist(), strict=True):
            gate, up = (ex.gate_up_proj[e] @ flat[n]).chunk(2)
            out[n] += w * (ex.down_proj[e] @ (F.silu(gate) * up))
        if m.shared_experts is not None:
            shared = m.shared_experts(flat[n])
            if m.shared_expert_gate is not None:
                shared = torch.sigmoid(m.shared_expert_gate(flat[n])) * shared
            out[n] += shared
    return out.reshape(x.shape)


def test_empty_experts_are_not_run() -> None:
    cfg = MoEConfig(n_experts=8, top_k=2, expert_dim=8, router="sigmoid", score_correction_bias=True)
    m = layer(cfg)
    m.gate.e_score_correction_bias[4:] = -10.0  # experts 4..7 can never be selected
    calls: list[int] = []  # every expert run, by either path
    run_one, run_group = m.experts.expert_forward, m.experts.forward_group
    m.experts.expert_forward = lambda e, x: (calls.append(e), run_one(e, x))[1]
    m.experts.forward_group = lambda lo, step, n, x: (
        calls.extend(range(lo, lo + n * step, step)),
        run_group(lo, step, n, x),
    )[1]
    with torch.no_grad():
        m(torch.randn(2, 9, D))
    assert m.last_counts[4:].tolist() == [0, 0, 0, 0]
    assert int(m.last_counts.sum()) == 2 * 9 * 2
    assert sorted(calls) == [e for e in range(8) if m.last_counts[e] > 0]
    calls.clear()
    with torch.no_grad():
        m(torch.randn(1, 1, D))  # one token: its two experts, directly
    assert len(calls) == 2 and all(e < 4 for e in calls)


def test_sparse_layer_equals_token_loop() -> None:
    cfg = MoEConfig(
        n_experts=6, top_k=2, expert_dim=8, norm_topk_prob=False, n_shared_experts=1, shared_expert_gate=True
    )
    m = layer(cfg, seed=1)
    x = torch.randn(3, 5, D)
    with torch.no_grad():
        assert torch.allclose(m(x), slow_reference(m, x), atol=1e-5)


def test_grouped_sigmoid_layer_equals_token_loop() -> None:
    cfg = MoEConfig(
        n_experts=8, top_k=2, expert_dim=8, router="sigmoid", n_group=4, topk_group=2, n_shared_experts=2
    )
    m = layer(cfg, seed=2)
    x = torch.randn(2, 6, D)
    with torch.no_grad():
        assert torch.allclose(m(x), slow_reference(m, x), atol=1e-5)


def test_gradients_reach_router_and_chosen_experts_only() -> None:
    m = layer(MoEConfig(n_experts=8, top_k=2, expert_dim=8), seed=3)
    x = torch.randn(1, 3, D)  # 3 tokens x 2 slots cannot reach all 8 experts
    m(x).square().sum().backward()
    assert m.gate.weight.grad.abs().sum() > 0
    touched = m.experts.down_proj.grad.flatten(1).abs().sum(1) > 0  # (E,)
    assert touched.tolist() == (m.last_counts > 0).tolist()
