"""Local dispatch: capacity drops equal DeepSpeed's own gating on the same logits, the grouped-matmul path
equals a loop over experts (forward and backward), and kept, dropped and padding assignments add up.

What DeepSpeed 0.19 (`deepspeed.moe.sharded_moe`, as `TopKGate` calls it) does with drop_tokens=True:
- capacity = max(ceil((tokens / E) * (factor * k)), min_capacity), in float32;
- k = 1 (`top1gating`): an expert keeps `capacity` of its tokens, chosen by `torch.topk` over a 0/1
  mask (random with RTS, in an unspecified tie order without); gates are the raw softmax probabilities;
- k = 2 (`top2gating`): first choices in token order, then second choices in token order; the two
  kept gates are renormalised over the kept experts;
- k >= 3 (`topkgating`, drop_policy "probs"): an expert keeps its `capacity` most probable assignments;
  gates renormalised over the kept experts.
mtmoe keeps the same assignments (for k = 1 the earliest ones, as `topkgating(drop_policy="position")`
does), but a dropped assignment keeps its gate weight, on the frozen FFN, through `dropped_weight_T`.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from deepspeed.moe.sharded_moe import _capacity, top1gating, top2gating, topkgating
from hypothesis import given, settings
from hypothesis import strategies as st

from mtmoe.model.dispatch import combine, dispatch, expert_capacity, grouped_linear
from mtmoe.model.routers import TopKRouter


def kept_pairs(d, num_experts):
    """(token, expert) of every kept assignment, in dispatch order."""
    expert_N = torch.repeat_interleave(torch.arange(num_experts), d.groups.counts_E)
    return list(zip(d.token_N.tolist(), expert_N.tolist(), strict=True))


def reference_kept(ids_TK, valid_T, num_experts, capacity, priority_TK=None):
    """The capacity rule, looped: each expert queues its assignments (first choices, then second, ...,
    earlier tokens first; for K >= 3 by descending priority, ties in that order) and keeps the first ones."""
    T, K = ids_TK.shape
    queues = {e: [] for e in range(num_experts)}
    for j in range(K):
        for t in range(T):
            if valid_T[t]:
                queues[int(ids_TK[t, j])].append((t, j))
    kept = set()
    for e, queue in queues.items():
        if capacity is not None and K >= 3:
            queue = sorted(queue, key=lambda tj: -float(priority_TK[tj]))  # stable
        kept |= {(t, e) for t, _ in queue[:capacity]}
    return kept


def skewed_logits(T, E, seed, skew):
    """Random logits; `skew` makes expert 0 hot for every token and expert 1 for the first half."""
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(seed))
    logits[:, 0] += skew
    logits[: T // 2, 1] += skew / 2
    return logits


def mtmoe_route(logits_TE, k):
    """Our TopKRouter on these logits (identity router weights): normalised top-k weights, ids, and the
    raw softmax probabilities of the chosen experts."""
    E = logits_TE.shape[1]
    router = TopKRouter(E, E, k, normalize=True)
    with torch.no_grad():
        router.weight_ED.copy_(torch.eye(E))
    route = router(logits_TE)
    probs_TK = logits_TE.softmax(dim=-1).gather(1, route.ids_TK)
    return route.ids_TK, route.weights_TK.detach(), probs_TK


def deepspeed_gating(logits_TE, k, capacity_factor, min_capacity, drop_policy=None):
    """DeepSpeed's combine weights [T, E, capacity], with noise, RTS and second-expert sampling off."""
    if k == 1 and drop_policy is None:
        out = top1gating(logits_TE.clone(), capacity_factor, min_capacity, None, None, True, False)
    elif k == 2 and drop_policy is None:
        out = top2gating(logits_TE.clone(), capacity_factor, min_capacity, True, None, False)
    else:
        policy = drop_policy or "probs"
        out = topkgating(logits_TE.clone(), k, capacity_factor, min_capacity, True, None, policy)
    combine_TEC, dispatch_mask_TEC = out[1], out[2]
    assert torch.equal(combine_TEC.bool(), dispatch_mask_TEC)
    return combine_TEC


def deepspeed_kept(combine_TEC):
    """{(token, expert): combine weight} of DeepSpeed's dispatched assignments."""
    weight_TE = combine_TEC.sum(-1)
    return {(t, e): float(weight_TE[t, e]) for t, e in combine_TEC.bool().any(-1).nonzero().tolist()}


# --- capacity --------------------------------------------------------------------------------------------


def test_capacity_is_deepspeeds_including_its_float32_rounding():
    naive_differs = 0
    for min_capacity in (0, 4):
        for factor in (0.1, 0.3, 0.5, 1.1, 1.25):
            for k in (1, 2, 3, 4):
                for E in (1, 3, 7, 8):
                    for T in range(1, 50):
                        gates = torch.empty(T, E)
                        ds = _capacity(gates, torch.tensor(factor * k), torch.tensor(min_capacity))
                        ours = expert_capacity(factor, T, k, E, min_capacity)
                        assert ours == int(ds), (factor, T, k, E, min_capacity)
                        naive_differs += ours != max(math.ceil(factor * T * k / E), min_capacity)
    assert naive_differs > 0  # the grid reaches products that float32 lifts past a whole number
    assert expert_capacity(0.1, 100, 3, 1) == 31 and expert_capacity(0.0, 100, 3, 1) is None


# --- kept assignments and combine weights vs DeepSpeed ---------------------------------------------------


@pytest.mark.parametrize("min_capacity", [0, 4])
@pytest.mark.parametrize("capacity_factor", [0.25, 0.5, 1.0, 1.3])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_kept_assignments_and_gates_match_deepspeed(k, capacity_factor, min_capacity):
    T, E = 45, 8
    for seed, skew in ((0, 0.0), (1, 3.0)):
        logits = skewed_logits(T, E, seed, skew)
        ids, weights, probs = mtmoe_route(logits, k)
        assert torch.equal(ids, logits.softmax(-1).topk(k, dim=-1).indices)
        d = dispatch(
            ids, weights, E, capacity_factor=capacity_factor, min_capacity=min_capacity, priority_TK=probs
        )
        ours = dict(zip(kept_pairs(d, E), d.weight_N.tolist(), strict=True))
        combine_TEC = deepspeed_gating(logits, k, capacity_factor, min_capacity)
        theirs = deepspeed_kept(combine_TEC)
        capacity = expert_capacity(capacity_factor, T, k, E, min_capacity)
        assert combine_TEC.shape[2] == capacity
        assert len(ours) + d.num_dropped == d.num_routed == T * k
        if skew:
            assert d.num_dropped > 0
        if k == 1:
            # DeepSpeed keeps as many of each expert's tokens (which ones: torch.topk's tie order);
            # its position policy keeps the earliest, as we do. Its top-1 gate is the raw probability.
            routed = set(zip(range(T), ids[:, 0].tolist(), strict=True))
            assert set(theirs) <= routed
            assert sorted(e for _, e in theirs) == sorted(e for _, e in ours)
            position = deepspeed_gating(logits, 1, capacity_factor, min_capacity, drop_policy="position")
            assert set(deepspeed_kept(position)) == set(ours)
            for t, e in theirs:
                assert theirs[t, e] == pytest.approx(float(probs[t, 0]), rel=1e-6)
            continue
        assert set(theirs) == set(ours)
        # DeepSpeed renormalises the gates over each token's kept experts; we keep the weights and send
        # the dropped share to the frozen FFN, so theirs = ours / (1 - our dropped weight).
        kept_share_T = torch.ones(T) if d.dropped_weight_T is None else 1 - d.dropped_weight_T
        for t, e in theirs:
            assert theirs[t, e] == pytest.approx(ours[t, e] / float(kept_share_T[t]), rel=1e-5)
        if k >= 3:  # raw probabilities as the weights (normalize_top_k off) rank the same without a priority
            plain = dispatch(ids, probs, E, capacity_factor=capacity_factor, min_capacity=min_capacity)
            assert set(kept_pairs(plain, E)) == set(theirs)


# --- the grouped-matmul path vs a loop over experts ------------------------------------------------------


@pytest.mark.parametrize("capacity_factor", [0.0, 0.75])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["grouped_mm", "loop-fallback"])
def test_grouped_path_equals_a_loop_over_experts_forward_and_backward(dtype, capacity_factor, monkeypatch):
    T, K, E, width_in, width_out = 12, 2, 6, 8, 12
    gen = torch.Generator().manual_seed(0)
    used_E = torch.tensor([0, 2, 3, 4])  # experts 1 and 5 (the last group) receive nothing
    ids = used_E[torch.rand(T, len(used_E), generator=gen).argsort(-1)[:, :K]]
    ids[:5, 0] = 2  # a hot expert, so the capacity drops
    ids[:5, 1] = torch.tensor([0, 3, 4, 0, 3])
    valid = torch.ones(T, dtype=torch.bool)
    valid[[3, 10, 11]] = False
    x = torch.randn(T, width_in, generator=gen, dtype=dtype, requires_grad=True)
    w = torch.randn(E, width_in, width_out, generator=gen, dtype=dtype, requires_grad=True)
    weights = torch.randn(T, K, generator=gen, dtype=dtype).softmax(-1).requires_grad_()
    grad_out = torch.randn(T, width_out, generator=gen, dtype=dtype)
    calls = []
    real_grouped_mm = F.grouped_mm
    monkeypatch.setattr(F, "grouped_mm", lambda *a, **kw: calls.append(1) or real_grouped_mm(*a, **kw))

    d = dispatch(ids, weights, E, valid, capacity_factor)
    fast = combine(grouped_linear(x[d.token_N], w, d.groups) * d.weight_N[:, None], d, T)
    assert bool(calls) == (dtype == torch.float32)
    assert d.groups.counts_E[[1, 5]].tolist() == [0, 0] and (d.num_dropped > 0) == (capacity_factor > 0)
    fast_grads = torch.autograd.grad(fast, (x, w, weights), grad_out)

    capacity = expert_capacity(capacity_factor, int(valid.sum()), K, E)
    kept = reference_kept(ids, valid, E, capacity)
    rows = [x.new_zeros(width_out) for _ in range(T)]
    for e in range(E):
        for t in range(T):
            for j in range(K):
                if int(ids[t, j]) == e and (t, e) in kept:
                    rows[t] = rows[t] + weights[t, j] * (x[t] @ w[e])
    slow = torch.stack(rows)
    slow_grads = torch.autograd.grad(slow, (x, w, weights), grad_out)

    torch.testing.assert_close(fast, slow)
    for got, want in zip(fast_grads, slow_grads, strict=True):
        torch.testing.assert_close(got, want)
    gx, gw, _ = fast_grads
    assert not gw[[1, 5]].any() and not gx[~valid].any()


# --- bookkeeping properties -----------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    T=st.integers(0, 24),
    K=st.integers(1, 4),
    extra_experts=st.integers(0, 5),
    capacity_factor=st.sampled_from([0.0, 0.2, 0.5, 1.0, 1.5]),
    min_capacity=st.sampled_from([0, 3]),
    pad_frac=st.sampled_from([None, 0.0, 0.3, 1.0]),
    tied_priority=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_dispatch_keeps_routes_drops_and_padding_consistent(
    T, K, extra_experts, capacity_factor, min_capacity, pad_frac, tied_priority, seed
):
    E = K + extra_experts
    gen = torch.Generator().manual_seed(seed)
    ids = torch.rand(T, E, generator=gen).argsort(-1)[:, :K]
    weights = torch.rand(T, K, generator=gen)
    valid = None if pad_frac is None else torch.rand(T, generator=gen) >= pad_frac
    priority = torch.randint(0, 3, (T, K), generator=gen).float() if tied_priority else None
    d = dispatch(ids, weights, E, valid, capacity_factor, min_capacity=min_capacity, priority_TK=priority)

    valid_T = torch.ones(T, dtype=torch.bool) if valid is None else valid
    real = {(t, int(ids[t, j])) for t in range(T) for j in range(K) if valid_T[t]}
    pairs = kept_pairs(d, E)
    kept = set(pairs)
    assert len(pairs) == len(kept) and kept <= real  # padding never dispatched, nothing twice
    assert d.num_routed == len(real) and len(kept) + d.num_dropped == d.num_routed
    capacity = expert_capacity(capacity_factor, int(valid_T.sum()), K, E, min_capacity)
    priority_TK = weights if priority is None else priority
    assert kept == reference_kept(ids, valid_T, E, capacity, priority_TK)
    if capacity is None:
        assert kept == real and d.num_dropped == 0
    else:
        assert max(d.groups.counts_E.tolist(), default=0) <= capacity
    assert torch.equal(d.groups.offsets_E, torch.cumsum(d.groups.counts_E, 0).to(torch.int32))
    # each group lists first choices before second ones, earlier tokens first
    slot = {(t, int(ids[t, j])): j * T + t for t in range(T) for j in range(K)}
    for e in range(E):
        slots = [slot[p] for p in pairs if p[1] == e]
        assert slots == sorted(slots)
    weight = {(t, int(ids[t, j])): float(weights[t, j]) for t in range(T) for j in range(K)}
    assert d.weight_N.tolist() == [weight[p] for p in pairs]
    dropped_T = torch.zeros(T)
    for (t, e), wt in weight.items():
        if (t, e) not in kept:
            dropped_T[t] += wt
    if d.dropped_weight_T is None:
        assert not dropped_T.any()
    else:
        torch.testing.assert_close(d.dropped_weight_T, dropped_T)
