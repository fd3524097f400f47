"""Task mixing: the right proportions, one stream split over ranks, per-task epochs, exact resume."""

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


def test_ranks_split_one_stream_and_epochs_are_counted():
    ranks = [MixingSampler([10, 12], "uniform", 1.0, seed=3, rank=r, world=2) for r in range(2)]
    single = MixingSampler([10, 12], "uniform", 1.0, seed=3, rank=0, world=1)
    for _ in range(6):
        a, b = (s.draw_batch(2) for s in ranks)
        assert a + b == single.draw_batch(4)  # the same global micro-batch, cut in two
    assert ranks[0].state_dict() == ranks[1].state_dict() == single.state_dict()
    # Within one epoch of a task, every sample comes exactly once.
    s = MixingSampler([10, 12], "uniform", 1.0, seed=3, rank=0, world=1)
    seen = {0: [], 1: []}
    while s.epoch[0] == 0 or s.epoch[1] == 0:
        epochs = list(s.epoch)
        d = s.draw()
        if epochs[d.task] == 0:
            seen[d.task].append(d.index)
    assert sorted(seen[0]) == list(range(10)) and sorted(seen[1]) == list(range(12))


def test_same_global_batch_on_any_world_size():
    """World 4 x 2 rows and world 1 x 2 rows x 4 micro-batches see the same rows per step."""
    four = [MixingSampler([7, 30, 4], "temperature", 2.0, seed=5, rank=r, world=4) for r in range(4)]
    one = MixingSampler([7, 30, 4], "temperature", 2.0, seed=5, rank=0, world=1)
    for _ in range(5):
        step_four = [d for s in four for d in s.draw_batch(2)]
        step_one = [d for _ in range(4) for d in one.draw_batch(2)]
        assert step_four == step_one


def test_resume_from_state_dict_continues_the_same_stream():
    a = MixingSampler([7, 30, 4], "temperature", 2.0, seed=1, rank=1, world=2)
    first = a.draw_batch(25)
    state = a.state_dict()
    rest = a.draw_batch(40)
    b = MixingSampler([7, 30, 4], "temperature", 2.0, seed=1, rank=1, world=2)
    b.load_state_dict(state)
    assert b.draw_batch(40) == rest
    assert first != rest[:25]


def test_empty_task_is_refused():
    with pytest.raises(ValueError, match="task #1 has no training samples"):
        MixingSampler([10, 0], "uniform", 1.0, seed=0, rank=0, world=4)


def test_upsampling_scales_a_task_before_temperature():
    np.testing.assert_allclose(mixing_probs([100, 100], "proportional", 1.0, [3.0, 1.0]), [0.75, 0.25])
    np.testing.assert_allclose(mixing_probs([100, 400], "temperature", 2.0, [4.0, 1.0]), [0.5, 0.5])


def test_a_capped_task_only_draws_inside_its_cap():
    s = MixingSampler([5, 50], "uniform", 1.0, seed=0, rank=0, world=1)
    draws = s.draw_batch(200)
    assert {d.index for d in draws if d.task == 0} == set(range(5))
