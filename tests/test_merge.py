"""Merge methods against hand-worked examples (each a pure function over a stack of ΔW)."""

import math
from fractions import Fraction

import pytest
import torch

from mtmoe.export.merge import (
    METHODS,
    breadcrumbs,
    dare,
    fraction_count,
    task_arithmetic,
    tensor_seed,
    ties,
    weighted_average,
)
from mtmoe.export.methods import MergeSpec

D = torch.tensor(
    [
        [[1.0, -2.0, 0.1, 3.0]],
        [[2.0, 1.0, -0.2, -1.5]],
        [[-4.0, 1.5, 0.3, 0.5]],
    ]
)  # three experts' deltas, each 1 x 4


def test_average_and_task_arithmetic():
    torch.testing.assert_close(weighted_average(D), D.mean(0))
    torch.testing.assert_close(weighted_average(D, torch.tensor([1.0, 0.0, 3.0])), (D[0] + 3 * D[2]) / 4)
    torch.testing.assert_close(task_arithmetic(D, lam=0.5), torch.tensor([[-0.5, 0.25, 0.1, 1.0]]))


def test_ties_trims_elects_the_sign_and_averages_the_agreeing_entries():
    # density 0.5 keeps the 2 largest of 4 magnitudes per expert:
    #   [0, -2, 0, 3], [2, 0, 0, -1.5], [-4, 1.5, 0, 0]; summed [-2, -0.5, 0, 1.5] elects signs [-, -, 0, +]
    #   entry 0: only -4 agrees; entry 1: only -2; entry 2: nothing survives; entry 3: only 3.
    torch.testing.assert_close(ties(D, density=0.5, lam=2.0), torch.tensor([[-8.0, -4.0, 0.0, 6.0]]))
    torch.testing.assert_close(ties(D[:1], density=1.0), D[0])  # one expert, nothing trimmed


def test_dare_is_seeded_unbiased_and_keeps_rescaled_entries():
    torch.testing.assert_close(dare(D, drop=0.0), task_arithmetic(D))
    one = torch.arange(1.0, 201.0).reshape(1, 10, 20)
    a, b = dare(one, drop=0.3, seed=7), dare(one, drop=0.3, seed=7)
    assert torch.equal(a, b) and not torch.equal(a, dare(one, drop=0.3, seed=8))
    kept = a != 0
    torch.testing.assert_close(a[kept], one[0][kept] / 0.7)  # survivors rescaled by 1/(1-p)
    assert 0.2 < 1 - kept.float().mean().item() < 0.4  # about p of the entries dropped
    mean = torch.stack([dare(D, drop=0.5, seed=s) for s in range(4000)]).mean(0)
    torch.testing.assert_close(mean, task_arithmetic(D), atol=0.15, rtol=0.05)  # E[DARE] = task arithmetic


def test_breadcrumbs_drops_outliers_and_small_entries():
    d = torch.tensor([[[0.1, -5.0, 0.5, 1.0, -2.0]], [[0.2, 0.4, 0.6, 0.8, 1.0]]])
    # beta 0.2 removes the single largest magnitude, gamma 0.4 the two smallest, per delta:
    #   [0, 0, 0, 1, -2] + [0, 0, 0.6, 0.8, 0] = [0, 0, 0.6, 1.8, -2]
    torch.testing.assert_close(
        breadcrumbs(d, beta=0.2, gamma=0.4, lam=2.0), torch.tensor([[0.0, 0.0, 1.2, 3.6, -4.0]])
    )


@pytest.mark.parametrize(
    "call",
    [
        lambda: ties(D, density=0.0),
        lambda: dare(D, drop=1.0),
        lambda: breadcrumbs(D, beta=0.5, gamma=0.5),
        lambda: weighted_average(D, torch.tensor([1.0, -1.0, 0.0])),
        lambda: task_arithmetic(D[0]),
    ],
)
def test_bad_arguments_are_refused(call):
    with pytest.raises(ValueError):
        call()


def test_every_method_is_a_pure_function():
    before = D.clone()
    for fn in METHODS.values():
        assert fn(D).shape == (1, 4)
    assert torch.equal(D, before)


# --- issue #16: TIES under expert shares, DARE masks per tensor, exact counts ---------------------------

D2 = torch.tensor([[[1.0, -2.0, 3.0, 0.5]], [[0.5, 1.0, -1.0, 0.25]]])


def _ties_reference(deltas, weights, density):
    """mergekit's TIES, entry by entry: magnitude trim, weighted sign vote, mean weighted by the agreeing."""
    E, n = deltas.shape[0], deltas[0].numel()
    k = math.ceil(Fraction(str(density)) * n)
    trimmed = []
    for d in deltas:
        flat = d.reshape(-1).tolist()
        top = sorted(range(n), key=lambda j: -abs(flat[j]))[:k]
        trimmed.append([flat[j] if j in top else 0.0 for j in range(n)])
    out = []
    for j in range(n):
        mass = sum(weights[e] * trimmed[e][j] for e in range(E))
        agree = [
            e for e in range(E) if trimmed[e][j] and weights[e] > 0 and (trimmed[e][j] > 0) == (mass > 0)
        ]
        den = sum(weights[e] for e in agree)
        out.append(sum(weights[e] * trimmed[e][j] for e in agree) / den if den and mass != 0 else 0.0)
    return torch.tensor(out, dtype=deltas.dtype).reshape(deltas.shape[1:])


def test_ties_weighs_the_disjoint_mean_by_the_expert_shares():
    only_first = MergeSpec.of("ties", density=1).merge(D2, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(only_first, D2[0])  # the only expert with a share: its own delta, as `average`
    torch.testing.assert_close(
        MergeSpec.of("ties", density=1).merge(D2, torch.tensor([0.9, 0.1])),
        torch.tensor([[0.95, -2.0, 3.0, 0.475]]),
    )
    equal = torch.tensor([[0.75, -2.0, 3.0, 0.375]])  # equal weights: the plain disjoint mean
    torch.testing.assert_close(ties(D2, density=1.0), equal)


def test_ties_matches_the_reference_for_random_experts_and_shares():
    gen = torch.Generator().manual_seed(0)
    deltas = torch.randn(4, 6, 10, generator=gen, dtype=torch.float64)
    shares = [0.7, 0.1, 0.1, 0.1]
    got = MergeSpec.of("ties", density=0.2).merge(deltas, torch.tensor(shares, dtype=torch.float64))
    torch.testing.assert_close(got, _ties_reference(deltas, shares, 0.2))
    assert got.norm() <= deltas.abs().amax(0).norm()  # never beyond the largest agreeing entry


def test_dare_draws_independent_masks_per_tensor_reproducibly():
    ones = torch.ones(1, 20, 30)
    spec = MergeSpec.of("dare", drop=0.5, seed=3)
    a = spec.merge(ones, torch.ones(1), "model.layers.0.mlp.up_proj")
    b = spec.merge(ones, torch.ones(1), "model.layers.1.mlp.up_proj")
    assert torch.equal(a, spec.merge(ones, torch.ones(1), "model.layers.0.mlp.up_proj"))  # reproducible
    assert not torch.equal(a != 0, b != 0)  # same shape, another tensor: another mask
    c = MergeSpec.of("dare", drop=0.5, seed=4).merge(ones, torch.ones(1), "model.layers.0.mlp.up_proj")
    assert not torch.equal(a != 0, c != 0)  # another run seed: another mask
    assert tensor_seed(3, "x") == tensor_seed(3, "x") != tensor_seed(3, "y")


def test_fraction_counts_are_exact():
    assert fraction_count(0.3, 45_088_768, up=True) == 13_526_631  # float32 gave 13,526,630
    assert fraction_count(0.3, 10, up=True) == 3  # 0.3 * 10 is 3.0000000000000004 in floats
    assert fraction_count(0.2, 5, up=True) == 1
    assert [fraction_count(b, 10, up=False) for b in (0.15, 0.25, 0.35)] == [1, 2, 3]


def test_ties_keeps_the_ceiling_count_at_large_sizes():
    n = 2**24 + 1  # density·n = 8388608.5, which float32 rounds down to 8388608
    kept = ties(torch.ones(1, 1, n), density=0.5)
    assert int((kept != 0).sum()) == 8_388_609


def test_breadcrumbs_removes_the_floor_of_each_fraction():
    d = torch.arange(1.0, 11.0).reshape(1, 1, 10)  # magnitudes 1..10
    for beta, removed in ((0.15, 1), (0.25, 2), (0.35, 3)):
        out = breadcrumbs(d, beta=beta, gamma=0.0)
        assert int((out == 0).sum()) == removed
        assert out[0, 10 - removed :].eq(0).all()  # the largest ones
