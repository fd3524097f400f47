"""AdaMerging: the entropy objective by hand, λ = shares reproduces the weighted average, and the learned
coefficients lower the held-out prediction entropy."""

import math

import numpy as np
import pytest
import torch
from test_export_options import _trained_like

from mtmoe.export.adamerging import adamerge, mean_entropy
from mtmoe.export.dense import fold_to_dense


class Shard:
    """A held-out shard of random token sequences (what `adamerge` reads: len, [i], name, task_id)."""

    def __init__(self, n, seed, name="t", task_id=0):
        rng = np.random.default_rng(seed)
        self.rows = [rng.integers(0, 64, size=int(rng.integers(5, 12))) for _ in range(n)]
        self.name, self.task_id = name, task_id

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i], np.ones_like(self.rows[i])


def test_mean_entropy_by_hand():
    uniform = torch.zeros(1, 2, 4)
    sharp = torch.tensor([[[100.0, 0, 0, 0], [0, 0, 0, 0]]])
    assert mean_entropy(uniform, torch.ones(1, 2)).item() == pytest.approx(math.log(4))
    assert mean_entropy(sharp, torch.tensor([[1, 0]])).item() == pytest.approx(
        0.0, abs=1e-6
    )  # padding ignored


def test_zero_steps_give_the_weighted_average():
    shares = {0: torch.tensor([0.1, 0.2, 0.3, 0.4]), 1: torch.full((4,), 0.25)}
    ada, record = adamerge(_trained_like(), [Shard(4, 0)], 0, shares, steps=0)
    avg = fold_to_dense(_trained_like(), shares)
    for (name, a), b in zip(ada.named_parameters(), avg.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    assert record["lambda"]["0"] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert record["entropy_before"] == pytest.approx(record["entropy_after"])


@pytest.mark.parametrize("granularity", ["layer", "task"])
def test_learned_coefficients_lower_the_entropy(granularity):
    shares = {0: torch.full((4,), 0.25), 1: torch.full((4,), 0.25)}
    shards = [Shard(8, 1), Shard(8, 2, "u", 1)]
    model = _trained_like()
    with torch.no_grad():  # larger expert deltas, so that the merge coefficients matter
        for n, p in model.named_parameters():
            if ".experts." in n:
                p.mul_(4.0)
    _, record = adamerge(model, shards, 0, shares, granularity=granularity, steps=30, lr=0.2)
    # A random tiny model predicts almost uniformly (entropy near ln 64), so the objective is flat; the
    # learned λ must still move and lower it (a wrong gradient sign would raise it).
    assert record["entropy_after"] < record["entropy_before"]
    assert max(abs(x - 0.25) for x in record["lambda"]["0"]) > 0.05
    if granularity == "task":
        assert record["lambda"]["0"] == record["lambda"]["1"]  # one λ per expert, shared by the layers
