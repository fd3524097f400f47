"""Task mixing: the right proportions, disjoint ranks, per-task epochs, exact resume."""

import numpy as np
import pytest

from mtmoe.data.sampler import MixingSampler, mixing_probs


def test_mixing_probabilities():
    np.testing.assert_allclose(mixing_probs([100, 300], "proportional", 1.0), [0.25, 0.75])
    np.testing.assert_allclose(mixing_probs([100, 400], "temperature", 2.0), [1 / 3, 2 / 3])
    np.testing.assert_allclose(mixing_probs([5, 500], "uniform", 1.0), [0.5, 0.5])
    with pytest.raises(ValueError, match="data.mixing"):
        mixing_probs([1], "random", 1.0)


def test_draws_follow_the_mix():
    s = MixingSampler([100, 300], "proportional", 1.0, seed=0, rank=0, world=1)
    tasks = [s.draw().task for _ in range(4000)]
    assert abs(np.mean(tasks) - 0.75) < 0.03


def test_ranks_see_disjoint_samples_within_an_epoch_and_epochs_are_counted():
    ranks = [MixingSampler([10, 12], "uniform", 1.0, seed=3, rank=r, world=2) for r in range(2)]
    seen = {r: {0: [], 1: []} for r in range(2)}
    for r, s in enumerate(ranks):
        while s.epoch[0] == 0 or s.epoch[1] == 0:
            d = s.draw()
            if s.epoch[d.task] == 0 or (s.cursor[d.task] == 0 and s.epoch[d.task] == 1):
                seen[r][d.task].append(d.index)
    for task, n in ((0, 10), (1, 12)):
        a, b = set(seen[0][task]), set(seen[1][task])
        assert not a & b
        assert a | b == set(range(n))


def test_resume_from_state_dict_continues_the_same_stream():
    a = MixingSampler([7, 30, 4], "temperature", 2.0, seed=1, rank=1, world=2)
    first = a.draw_batch(25)
    state = a.state_dict()
    rest = a.draw_batch(40)
    b = MixingSampler([7, 30, 4], "temperature", 2.0, seed=1, rank=1, world=2)
    b.load_state_dict(state)
    assert b.draw_batch(40) == rest
    assert first != rest[:25]


def test_task_smaller_than_world_is_refused():
    with pytest.raises(ValueError, match="fewer than the 4 ranks"):
        MixingSampler([10, 3], "uniform", 1.0, seed=0, rank=0, world=4)


def test_upsampling_scales_a_task_before_temperature():
    np.testing.assert_allclose(mixing_probs([100, 100], "proportional", 1.0, [3.0, 1.0]), [0.75, 0.25])
    np.testing.assert_allclose(mixing_probs([100, 400], "temperature", 2.0, [4.0, 1.0]), [0.5, 0.5])


def test_a_capped_task_only_draws_inside_its_cap():
    s = MixingSampler([5, 50], "uniform", 1.0, seed=0, rank=0, world=1)
    draws = s.draw_batch(200)
    assert {d.index for d in draws if d.task == 0} == set(range(5))
