"""Merge methods against hand-worked examples (each a pure function over a stack of ΔW)."""

import pytest
import torch

from mtmoe.export.merge import METHODS, breadcrumbs, dare, task_arithmetic, ties, weighted_average

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
