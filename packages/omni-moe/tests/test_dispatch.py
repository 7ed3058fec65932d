"""Sparse dispatch (load-paired bmm groups, one-token path) equals the reference loop: sort the slots by
expert, one F.linear chain per expert that got tokens, index_add_ back (the first implementation).
"""

from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from omni_moe import Experts
from omni_moe.dispatch import dispatch, pairs

D, EXPERT_DIM = 16, 8


def reference_dispatch(x, weights, indices, experts):
    k = indices.shape[1]
    flat = indices.reshape(-1)
    order = flat.argsort(stable=True)
    tokens = order // k
    slot_w = weights.reshape(-1)[order]
    counts = torch.bincount(flat, minlength=experts.n_experts)
    out = torch.zeros_like(x)
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n == 0:
            continue
        tok = tokens[start : start + n]
        gate, up = F.linear(x[tok], experts.gate_up_proj[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, experts.down_proj[e]) * slot_w[start : start + n, None].to(x.dtype)
        out.index_add_(0, tok, y)
        start += n
    return out, counts


def setup(n_experts, top_k, n, seed=0, skew=0.0, dtype=torch.float64):
    """Experts, inputs (N, D) and a top-k softmax routing; `skew` favours the low expert ids."""
    g = torch.Generator().manual_seed(seed)
    experts = Experts(n_experts, D, EXPERT_DIM).to(dtype)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.3)
    x = torch.randn(n, D, generator=g, dtype=dtype)
    logits = torch.randn(n, n_experts, generator=g, dtype=dtype) - skew * torch.arange(n_experts)
    top = logits.topk(top_k, dim=-1)
    return experts, x, top.values.softmax(dim=-1), top.indices


@pytest.mark.parametrize("n", [1, 2, 7, 64, 300])
@pytest.mark.parametrize(("n_experts", "top_k"), [(4, 1), (16, 2), (64, 4)])
def test_dispatch_equals_reference_loop(n, n_experts, top_k):
    experts, x, w, idx = setup(n_experts, top_k, n, seed=n)
    with torch.no_grad():
        got, counts = dispatch(x, w, idx, experts)
        want, want_counts = reference_dispatch(x, w, idx, experts)
    assert torch.equal(counts, want_counts)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_skewed_loads_still_match():
    experts, x, w, idx = setup(16, 2, 200, skew=0.4)
    counts = torch.bincount(idx.reshape(-1), minlength=16)
    assert counts.max() > 3 * counts[counts > 0].min(), "the skew should make loads uneven"
    with torch.no_grad():
        torch.testing.assert_close(dispatch(x, w, idx, experts)[0], reference_dispatch(x, w, idx, experts)[0])


def test_float32_inference_mode_matches():
    # The in-place SwiGLU activation is taken here (no gradient), so check it in the dtype it runs in.
    experts, x, w, idx = setup(64, 4, 128, dtype=torch.float32)
    with torch.inference_mode():
        got, _ = dispatch(x, w.float(), idx, experts)
        want, _ = reference_dispatch(x, w.float(), idx, experts)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_empty_batch():
    experts, x, w, idx = setup(8, 2, 0)
    out, counts = dispatch(x, w, idx, experts)
    assert out.shape == (0, D) and counts.tolist() == [0] * 8


@pytest.mark.parametrize("n", [1, 40])
def test_gradients_equal_reference(n):
    experts, x, w, idx = setup(8, 2, n, seed=3)
    grads = []
    for fn in (dispatch, reference_dispatch):
        experts.zero_grad()
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        fn(xi, wi, idx, experts)[0].square().sum().backward()
        grads.append([xi.grad, wi.grad, experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone()])
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_pairs_examples():
    # Loads 3, 5, 1, 4 on experts 0, 2, 3, 4: ranked 1 (e3), 3 (e0), 4 (e4), 5 (e2).
    assert pairs([3, 0, 5, 1, 4]) == [(0, 3, 2, 3), (2, 2, 2, 5)]
    assert pairs([0, 7, 0]) == [(1, 1, 1, 7)]
    assert pairs([0, 0]) == []


@given(st.lists(st.integers(0, 50), min_size=1, max_size=80))
def test_pairs_cover_busy_experts_ranked_by_load(counts):
    groups = pairs(counts)
    members = [[lo + j * step for j in range(m)] for lo, step, m, _ in groups]
    assert sorted(e for g in members for e in g) == [e for e, c in enumerate(counts) if c > 0]
    assert all(len(g) == 2 for g in members[:-1])  # only the last, the heaviest, may be alone
    for (_, _, _, cap), g in zip(groups, members, strict=True):
        assert cap == max(counts[e] for e in g)
    # Ranked by load: no expert of a later group is lighter than one of an earlier group.
    for a, b in pairwise(members):
        assert max(counts[e] for e in a) <= min(counts[e] for e in b)
