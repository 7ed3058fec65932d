"""Router selection and weights against direct formulas; group limits; Sinkhorn balance."""

import torch

from omni_moe import MoEConfig, Router, group_mask, route, sinkhorn


def logits(n: int = 64, e: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, e, generator=torch.Generator().manual_seed(seed)) * 2


def as_sets(indices: torch.Tensor) -> list[set[int]]:
    return [set(row) for row in indices.tolist()]


def test_softmax_renormalised_equals_topk_then_softmax() -> None:
    lg = logits()
    w, idx = route(lg, MoEConfig(n_experts=8, top_k=3, expert_dim=4, norm_topk_prob=True))
    top_vals, top_idx = lg.topk(3, dim=-1)  # Mixtral's original formula
    assert as_sets(idx) == as_sets(top_idx)
    want = top_vals.softmax(dim=-1)
    got = w.gather(1, torch.argsort(idx, dim=1)).sort(dim=1).values
    assert torch.allclose(got, want.sort(dim=1).values, atol=1e-6)
    assert torch.allclose(w.sum(-1), torch.ones(64))


def test_softmax_without_renormalisation_keeps_full_softmax_probs() -> None:
    lg = logits()
    w, idx = route(lg, MoEConfig(n_experts=8, top_k=2, expert_dim=4, norm_topk_prob=False))
    assert torch.allclose(w, lg.softmax(-1).gather(1, idx))
    assert (w.sum(-1) < 1).all()


def test_sigmoid_bias_selects_but_does_not_weight() -> None:
    lg = logits()
    bias = torch.zeros(8)
    bias[7] = 5.0  # forces expert 7 into every token's choice
    cfg = MoEConfig(n_experts=8, top_k=2, expert_dim=4, router="sigmoid", routed_scaling_factor=2.5)
    w, idx = route(lg, cfg, bias)
    assert all(7 in s for s in as_sets(idx))
    s = lg.sigmoid()
    assert as_sets(idx) == as_sets((s + bias).topk(2, -1).indices)
    chosen = s.gather(1, idx)
    assert torch.allclose(w, chosen / chosen.sum(-1, keepdim=True) * 2.5)


def test_group_limited_selection_stays_in_kept_groups() -> None:
    lg = logits(n=256, e=16, seed=1)
    cfg = MoEConfig(n_experts=16, top_k=3, expert_dim=4, router="sigmoid", n_group=4, topk_group=2)
    _, idx = route(lg, cfg)
    s = lg.sigmoid().view(256, 4, 4)  # (N, G, E/G)
    kept = s.topk(2, -1).values.sum(-1).topk(2, -1).indices  # (N, topk_group)
    for chosen, groups in zip(as_sets(idx), kept.tolist(), strict=True):
        assert {c // 4 for c in chosen} <= set(groups)
    # Without the limit some tokens would pick outside those groups, so the check above has teeth.
    _, free = route(lg, MoEConfig(n_experts=16, top_k=3, expert_dim=4, router="sigmoid"))
    assert as_sets(free) != as_sets(idx)


def test_group_mask_masks_whole_groups() -> None:
    choice = torch.tensor([[0.9, 0.8, 0.1, 0.1, 0.5, 0.5, 0.7, 0.0]])  # group sums 1.7, 0.2, 1.0, 0.7
    masked = group_mask(choice, n_group=4, topk_group=2)
    assert torch.isinf(masked).tolist() == [[False, False, True, True, False, False, True, True]]


def test_sinkhorn_balances_columns() -> None:
    lg = logits(n=512, e=8) + torch.linspace(0, 4, 8)  # skewed toward the last experts
    p = sinkhorn(lg, n_iters=30)
    cols = p.sum(0)
    assert torch.allclose(cols, torch.full((8,), 512 / 8), rtol=1e-4)
    assert torch.allclose(p.sum(1), torch.ones(512), atol=1e-2)


def test_sinkhorn_routing_in_training_only_and_more_balanced() -> None:
    torch.manual_seed(0)
    cfg = MoEConfig(n_experts=8, top_k=1, expert_dim=4, norm_topk_prob=False, sinkhorn_iters=20)
    router = Router(16, cfg)
    with torch.no_grad():
        router.weight.normal_(0, 0.5)
        router.weight[0] += 0.5  # expert 0 is liked by every token
    x = torch.randn(1024, 16) + 1.0
    router.eval()
    _, idx_eval, _ = router(x)
    router.train()
    w_train, idx_train, lg = router(x)
    load_eval = torch.bincount(idx_eval.flatten(), minlength=8).float()
    load_train = torch.bincount(idx_train.flatten(), minlength=8).float()
    assert load_eval.max() / load_eval.mean() > 2.0
    assert load_train.max() / load_train.mean() < 1.3
    # Weights still come from the router's softmax, not from the Sinkhorn matrix.
    assert torch.allclose(w_train, lg.softmax(-1).gather(1, idx_train))
    assert lg.shape == (1024, 8)
