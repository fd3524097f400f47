"""Expert parallelism at the block level: capacity index math, and EP blocks in real gloo processes equal a
single-process block holding every expert, forward and backward, dropless and with a capacity."""

import math

import pytest
import torch
import torch.nn.functional as F
from test_block import make_block

from mtmoe.model.dispatch import dispatch, expert_capacity
from mtmoe.parallel.expert_parallel import check_ep_size
from mtmoe.parallel.spawn import run_ranks


def test_capacity_keeps_first_choices_first_and_counts_drops():
    # 4 tokens, top-2, 2 experts: capacity ceil(0.5 * 4 * 2 / 2) = 2 per expert.
    ids = torch.tensor([[0, 1], [0, 1], [0, 1], [1, 0]])
    w = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.8, 0.2], [0.9, 0.1]])
    assert expert_capacity(0.5, 4, 2, 2) == 2 and expert_capacity(0.0, 4, 2, 2) is None
    d = dispatch(ids, w, 2, capacity_factor=0.5)
    # Expert 0: first choices of tokens 0, 1, 2 -> tokens 0, 1 fit; expert 1: first choice of token 3,
    # then second choices of tokens 0, 1, 2 -> tokens 3, 0 fit.
    assert d.token_N.tolist() == [0, 1, 3, 0]
    assert d.groups.counts_E.tolist() == [2, 2]
    assert (d.num_routed, d.num_dropped) == (8, 4)
    torch.testing.assert_close(d.dropped_weight_T, torch.tensor([0.0, 0.3, 1.0, 0.1]))


def test_padding_is_never_dispatched_and_keeps_its_gate_weight_on_the_base():
    ids = torch.tensor([[1, 0], [0, 1], [1, 0]])
    w = torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.6, 0.4]])
    d = dispatch(ids, w, 2, valid_T=torch.tensor([True, False, True]))
    assert sorted(d.token_N.tolist()) == [0, 0, 2, 2]
    assert (d.num_routed, d.num_dropped) == (4, 0)
    torch.testing.assert_close(d.dropped_weight_T, torch.tensor([0.0, 1.0, 0.0]))


def test_block_with_capacity_and_padding_equals_a_reference_where_drops_use_the_base_ffn():
    block = make_block(16, 32, 4, 2, 4)
    block.capacity_factor = 0.5
    x_BSD = torch.randn(1, 12, 16)
    valid_T = torch.ones(12, dtype=torch.bool)
    valid_T[-3:] = False  # three padding tokens
    block.context.valid_T = valid_T
    out = block(x_BSD)
    assert block.context.dropped > 0
    x_TD = x_BSD.reshape(12, 16)
    route = block.router(x_TD)
    d = dispatch(route.ids_TK, route.weights_TK, 4, valid_T, 0.5)
    kept = set(
        zip(
            d.token_N.tolist(),
            [int(e) for e in torch.repeat_interleave(torch.arange(4), d.groups.counts_E).tolist()],
            strict=True,
        )
    )
    s, base, ex = block.experts.scaling, block.base, block.experts

    def ffn(x, e):
        w = {
            p: getattr(base, f"{p}_proj").weight
            + (0 if e is None else s * (ex.factors(p)[0][e] @ ex.factors(p)[1][e]).t())
            for p in ("gate", "up", "down")
        }
        return (F.silu(x @ w["gate"].t()) * (x @ w["up"].t())) @ w["down"].t()

    ref = []
    for t in range(12):
        y = 0
        for j in range(2):
            e = int(route.ids_TK[t, j])
            y = y + route.weights_TK[t, j] * ffn(x_TD[t], e if (t, e) in kept else None)
        ref.append(y)
    torch.testing.assert_close(out.reshape(12, 16), torch.stack(ref), atol=1e-5, rtol=1e-4)
    assert all(t < 9 for t, _ in kept)


def test_ep_size_must_divide_experts_and_world():
    check_ep_size(2, 4, 4)
    with pytest.raises(ValueError, match="parallel.ep_size.*num_experts=6.*world size 4"):
        check_ep_size(4, 6, 4)
    with pytest.raises(ValueError, match="parallel.ep_size"):
        check_ep_size(4, 8, 2)


def _ep_block_worker(rank, world, ep_size, capacity, uneven):
    """Runs an EP block and a full single-process block on this rank's tokens; returns the differences."""
    import torch.distributed as dist

    from mtmoe.parallel.dist import init_distributed
    from mtmoe.parallel.expert_parallel import create_placement

    init_distributed("gloo")
    placement = create_placement(ep_size, 8)
    d, f, e, k, r = 16, 32, 8, (1 if uneven else 2), 4
    full = make_block(d, f, e, k, r, seed=0)  # every rank builds the same full block
    ep = make_block(d, f, e, k, r, seed=0)
    ep.placement = placement
    with torch.no_grad():  # keep only this rank's experts
        for name, p in list(ep.experts.named_parameters()):
            setattr(ep.experts, name, torch.nn.Parameter(p[placement.local].clone()))
    for b in (full, ep):
        b.capacity_factor = capacity
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(2, 6 + 3 * rank, d, generator=gen)  # ranks hold different numbers of tokens
    if uneven and rank == 0:  # every token of rank 0 goes to expert 5
        x = full.router.weight_ED[5].detach() * 50 + 0.01 * x
    grad_out = torch.randn(x.shape, generator=gen)
    outs = {}
    for name, block in (("full", full), ("ep", ep)):
        xr = x.clone().requires_grad_()
        y = block(xr)
        y.backward(grad_out)
        outs[name] = (y.detach(), xr.grad, {n: p.grad.clone() for n, p in block.named_parameters()})
    if uneven and rank == 0:
        ids = full.router(x.reshape(-1, d)).ids_TK
        assert set(ids.flatten().tolist()) == {5}
    y_full, gx_full, g_full = outs["full"]
    y_ep, gx_ep, g_ep = outs["ep"]

    def rel(ref, got):
        return ((ref - got).abs().max() / ref.abs().max().clamp_min(1e-3)).item()

    errors = {"out": rel(y_full, y_ep), "x_grad": rel(gx_full, gx_ep)}
    if k > 1:  # with top-1 the renormalised gate is exactly 1: its router gradient is rounding noise
        errors["router_grad"] = rel(g_full["router.weight_ED"], g_ep["router.weight_ED"])
    for n in ("gate_a", "up_b", "down_a", "down_b"):
        # An expert's gradient on its owner sums the contributions of every rank's tokens.
        total = g_full[f"experts.{n}"].clone()
        dist.all_reduce(total, group=placement.group)
        errors[n] = rel(total[placement.local], g_ep[f"experts.{n}"])
    errors["dropped"] = full.context.dropped
    dist.barrier()
    return errors


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "world,ep_size,capacity,uneven",
    [(2, 2, 0.0, False), (2, 2, 1.0, False), (4, 4, 0.0, False), (4, 2, 1.0, False), (2, 2, 0.0, True)],
    ids=["2proc-dropless", "2proc-capacity", "4proc-ep4-dropless", "4proc-ep2-capacity", "uneven-dropless"],
)
def test_ep_block_equals_single_process_block(world, ep_size, capacity, uneven):
    results = run_ranks(_ep_block_worker, world, ep_size, capacity, uneven)
    for rank, errors in enumerate(results):
        dropped = errors.pop("dropped")
        for key, err in errors.items():
            assert err < 1e-5, f"rank {rank}: {key} differs by {err} (relative to its largest entry)"
        if capacity:
            assert dropped > 0, "the capacity test should drop assignments"
    assert math.isfinite(sum(sum(r.values()) for r in results))
