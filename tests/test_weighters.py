"""Task weighters against hand-computed references, and their state round trip."""

import json
import math

import pytest
import torch

from mtmoe.balance.task_loss import balanced_loss
from mtmoe.balance.weighters import DWA, FAMO, WEIGHTERS, CoBa, Static, Uncertainty, Uniform, build_weighter
from mtmoe.balance.weighters.coba import window_slope
from mtmoe.config import load_config

ALL = torch.tensor([True, True])
ALL3 = torch.tensor([True, True, True])


def test_uniform_and_static():
    assert Uniform(3).weights().tolist() == [1.0, 1.0, 1.0]
    assert Static(3, ["a", "b", "c"], {"b": 2.5}).weights().tolist() == [1.0, 2.5, 1.0]
    with pytest.raises(ValueError, match="balance.options.weights.*'z'"):
        Static(2, ["a", "b"], {"z": 1.0})


def test_weighted_balanced_loss_hand_worked():
    sums, counts = torch.tensor([6.0, 0.0, 60.0]), torch.tensor([3.0, 0.0, 3.0])
    got = balanced_loss(sums, counts, grad_scale=1.0, weights_X=torch.tensor([2.0, 7.0, 0.5]))
    assert got.item() == pytest.approx((2 * 2.0 + 0.5 * 20.0) / (2 + 0.5))  # task 1 absent: not in the sum


def test_weighted_loss_divides_by_the_present_tasks_weight_sum():
    # token means [3, -, 4] (task 1 absent), weights [0.3, 1.8, 0.9]: MFTCoder's 4.5 / 1.2 = 3.75
    sums, counts = torch.tensor([6.0, 0.0, 8.0]), torch.tensor([2.0, 0.0, 2.0])
    w = torch.tensor([0.3, 1.8, 0.9])
    assert balanced_loss(sums, counts, 1.0, w).item() == pytest.approx(3.75)
    assert balanced_loss(sums, counts, 1.0, 5 * w).item() == pytest.approx(3.75)  # only the ratios count
    assert balanced_loss(sums, counts, 4.0, w).item() == pytest.approx(4 * 3.75)  # the gradient scale
    assert balanced_loss(sums, counts, 1.0, w, "task_count").item() == pytest.approx(4.5 / 2)
    # with every task present, weights summing to K give the same loss under both rules
    full = torch.tensor([2.0, 1.0, 2.0])
    k3 = torch.tensor([0.5, 1.5, 1.0])
    assert balanced_loss(sums + 1, full, 1.0, k3).item() == pytest.approx(
        balanced_loss(sums + 1, full, 1.0, k3, "task_count").item()
    )
    zero = torch.tensor([0.0, 1.0, 0.0])  # no present task has weight: a zero loss, not a NaN
    assert balanced_loss(sums.requires_grad_(), counts, 1.0, zero).item() == 0.0
    with pytest.raises(ValueError, match="normalize_by"):
        balanced_loss(sums, counts, 1.0, w, "tokens")


def test_every_weighter_names_its_normalisation():
    assert {name: cls.normalize_by for name, cls in WEIGHTERS.items()} == {
        **{name: "weight_sum" for name in WEIGHTERS},
        "uncertainty": "task_count",
    }


def test_dwa_hand_worked():
    w = DWA(2, temperature=2.0, ema=0.0)
    assert w.weights().tolist() == [1.0, 1.0]
    w.observe(torch.tensor([2.0, 1.0]), ALL)
    assert w.weights().tolist() == [1.0, 1.0]  # one observation: no ratio yet
    w.observe(torch.tensor([1.0, 1.0]), ALL)
    e0, e1 = math.exp(0.5 / 2), math.exp(1.0 / 2)
    assert w.weights().tolist() == pytest.approx([2 * e0 / (e0 + e1), 2 * e1 / (e0 + e1)])


def test_uncertainty_hand_worked_and_fixed_point():
    w = Uncertainty(2, lr=0.5)
    w.observe(torch.tensor([2.0, 0.5]), ALL)  # grad = 1 - exp(-0) L = [-1, 0.5]
    assert w.weights().tolist() == pytest.approx([math.exp(-0.5), math.exp(0.25)])
    for _ in range(500):
        w.observe(torch.tensor([2.0, 0.5]), ALL)
    assert w.weights().tolist() == pytest.approx([0.5, 2.0], rel=1e-6)  # w_k -> 1 / L_k


def test_famo_hand_worked():
    w = FAMO(2, lr=0.025, weight_decay=0.0)
    w.observe(torch.tensor([2.0, 1.0]), ALL)
    # z uniform; w_k = K z_k (1/L_k) / sum_j z_j / L_j
    assert w.weights().tolist() == pytest.approx([2 * 0.25 / 0.75, 2 * 0.5 / 0.75])
    w.observe(torch.tensor([1.0, 1.0]), ALL)
    # log-loss decrease [log 2, 0]; J^T d = [0.25 log 2, -0.25 log 2]; Adam's first step is ±lr.
    assert w.logits.tolist() == pytest.approx([-0.025, 0.025], rel=1e-6)
    assert w.z()[0] < w.z()[1]  # the task that improved most loses weight


def test_absent_tasks_keep_their_state():
    w = Uncertainty(2, lr=0.5)
    w.observe(torch.tensor([2.0, 0.0]), torch.tensor([True, False]))
    assert w.log_var[1].item() == 0.0


@pytest.mark.parametrize("name", sorted(WEIGHTERS))
def test_state_dict_resume_reproduces_weights(name):
    options = {"static": ["balance.options.weights={b: 3}"], "coba": ["balance.options.warmup=3"]}
    overrides = [f"balance.weighter={name}", *options.get(name, [])]
    cfg = load_config(None, overrides).balance
    a, b = build_weighter(cfg, ["a", "b", "c"]), build_weighter(cfg, ["a", "b", "c"])
    g = torch.Generator().manual_seed(0)
    losses = [torch.rand(3, generator=g, dtype=torch.float64) * 3 + 0.1 for _ in range(8)]
    present = torch.tensor([True, True, True])
    for loss in losses[:4]:
        a.observe(loss, present)
        a.observe_validation(loss * 2, present)
    b.load_state_dict(a.state_dict())
    for loss in losses[4:]:
        for w in (a, b):
            w.observe(loss, present)
            w.observe_validation(loss * 2, present)
        counts = loss * 10  # any positive token counts
        torch.testing.assert_close(a.weights(counts), b.weights(counts))
    if name not in ("uniform", "static", "token_mean"):
        assert not torch.allclose(a.weights(), torch.ones(3, dtype=torch.float64))


def test_window_slope_is_least_squares_and_skips_absent_points():
    x = list(range(5))
    assert window_slope(x, [3 - 0.5 * v for v in x]) == pytest.approx(-0.5)
    y = [3.0, float("nan"), 2.0, float("nan"), 1.0]
    assert window_slope(x, y) == pytest.approx(-0.5)  # the absent steps' indices are dropped too
    assert window_slope(x[:1], y[:1]) == 0.0
    g = torch.Generator().manual_seed(0)
    noisy = (torch.rand(50, generator=g, dtype=torch.float64) + torch.arange(50) * 0.01).tolist()
    design = torch.stack([torch.arange(50.0, dtype=torch.float64), torch.ones(50, dtype=torch.float64)], 1)
    target = torch.tensor(noisy, dtype=torch.float64)[:, None]
    reference = torch.linalg.lstsq(design, target).solution[0, 0].item()
    assert window_slope(list(range(50)), noisy) == pytest.approx(reference, rel=1e-9)


def test_window_slope_is_deterministic():
    g = torch.Generator().manual_seed(1)
    y = (torch.rand(200, generator=g, dtype=torch.float64) * 3).tolist()
    x = list(range(200))
    assert len({window_slope(x, y) for _ in range(200)}) == 1


@pytest.mark.parametrize("warmup,history", [(3, 2), (100, 50), (51, 50), (4, 4)])
def test_coba_warmup_longer_than_history(warmup, history):
    cb = CoBa(2, warmup=warmup, history=history)
    cb.observe_validation(torch.tensor([2.0, 4.0]), ALL)
    for s in range(1, warmup + 5):
        cb.observe_validation(torch.tensor([2.0 - 0.01 * s, 4.0 - 0.005 * s]), ALL)
    w = cb.weights()
    assert torch.isfinite(w).all() and w.sum().item() == pytest.approx(2.0)
    assert w[1] > w[0]  # the slower task gets more weight


def test_coba_task_missing_from_validation_keeps_weight_one_until_it_has_a_history():
    cb = CoBa(3, warmup=2, history=10)
    seen = torch.tensor([True, True, False])
    cb.observe_validation(torch.tensor([2.0, 4.0, 0.0]), seen)
    for s in range(1, 6):
        cb.observe_validation(torch.tensor([2.0 - 0.1 * s, 4.0 - 0.05 * s, 0.0]), seen)
    w = cb.weights()
    assert w[2].item() == 1.0  # never validated: neutral, not the "stalled" task that takes most weight
    assert w[:2].sum().item() == pytest.approx(2.0) and w[1] > w[0]
    assert cb.last_scores["tasks"] == [0, 1]
    # once it has two points it joins
    for s in range(6, 9):
        cb.observe_validation(torch.tensor([2.0 - 0.1 * s, 4.0 - 0.05 * s, 3.0 - 0.2 * s]), ALL3)
    assert cb.last_scores["tasks"] == [0, 1, 2] and cb.weights().sum().item() == pytest.approx(3.0)
    restored = CoBa(3, warmup=2, history=10)
    restored.load_state_dict(json.loads(json.dumps(cb.state_dict())))  # NaN slopes survive JSON
    for w_ in (cb, restored):
        w_.observe_validation(torch.tensor([1.0, 3.0, 1.0]), ALL3)
    assert torch.equal(cb.weights(), restored.weights())


def test_coba_divergence_factor_is_capped_at_one():
    cb = CoBa(2, warmup=2, history=10)
    cb.observe_validation(torch.tensor([1.0, 1.0]), ALL)
    raw = []
    for s in range(1, 8):  # the worst task's fall speeds up: the uncapped divergence factor reaches 5
        worst = 1.0 - 0.01 * s if s < 5 else 0.96 - 0.1 * (s - 4)
        cb.observe_validation(torch.tensor([0.5 - 0.02 * s, worst]), ALL)
        if s >= 2:
            total = torch.tensor(cb.total_slopes, dtype=torch.float64)
            m = len(total)
            raw.append(float(torch.softmax(-m * total / total.abs().sum() * cb.tau, 0)[-1] * m))
            assert cb.last_scores["df"] == pytest.approx(min(raw[-1], 1.0))
    assert max(raw) > 1.0  # the cap was needed


def test_coba_warmup_then_hand_worked_weights():
    w = CoBa(2, warmup=2, history=10, tau=1.0)
    both = torch.tensor([True, True])
    w.observe_validation(torch.tensor([2.0, 4.0]), both)  # before training: the normalisation
    w.observe_validation(torch.tensor([1.0, 4.0]), both)  # normalised [0.5, 1]
    assert w.weights().tolist() == [1.0, 1.0]  # still warming up
    w.observe_validation(torch.tensor([0.5, 4.0]), both)  # normalised [0.25, 1]
    # slopes: task 0 -0.25, task 1 0; worst-task slope 0 -> DF = 1, so weights = softmax(K * RCS)
    rcs = torch.softmax(torch.tensor([-2.0, 0.0], dtype=torch.float64), 0)
    torch.testing.assert_close(w.last_scores["rcs"], rcs)
    acs = torch.softmax(torch.tensor([1.0, 0.0], dtype=torch.float64), 0)
    torch.testing.assert_close(w.last_scores["acs"], acs)
    assert w.last_scores["df"] == pytest.approx(1.0)
    expected = 2 * torch.softmax(2 * rcs, 0)
    torch.testing.assert_close(w.weights(), expected)
    assert w.weights()[1] > w.weights()[0]  # the stalled task gets the weight


def test_coba_weight_floor():
    g = torch.Generator().manual_seed(1)
    w = CoBa(6, warmup=2, history=5)
    every = torch.ones(6, dtype=torch.bool)
    w.observe_validation(torch.ones(6), every)
    for step in range(1, 12):
        fast = torch.tensor([1.0] + [0.05**step] * 5)  # one stalled task, five collapsing
        w.observe_validation(fast * (1 + 0.01 * torch.rand(6, generator=g)), every)
        weights = w.weights()
        assert weights.sum().item() == pytest.approx(6.0)
        assert (weights / 6).min().item() >= 1 / 60 - 1e-12


def test_token_mean_weights_make_every_token_count_the_same():
    from mtmoe.balance.weighters import TokenMean

    sums, counts = torch.tensor([6.0, 0.0, 60.0]), torch.tensor([3.0, 0.0, 30.0])
    weights = TokenMean(3).weights(counts)
    got = balanced_loss(sums, counts, grad_scale=1.0, weights_X=weights)
    assert got.item() == pytest.approx(66.0 / 33.0)


def test_a_registered_weighter_is_chosen_by_name_with_its_checked_options():
    import dataclasses

    from mtmoe.balance.weighters import TaskWeighter, register_weighter

    @dataclasses.dataclass(kw_only=True)
    class HalfOptions:
        """Options of `half`.

        Attributes:
            factor: The weight of every task.
        """

        factor: float = 0.5

    @register_weighter("half_for_test", HalfOptions)
    class Half(TaskWeighter):
        def __init__(self, num_tasks, factor):
            super().__init__(num_tasks)
            self.factor = factor

        def weights(self, counts_X=None):
            return torch.full((self.num_tasks,), self.factor, dtype=torch.float64)

    try:
        cfg = load_config(None, ["balance.weighter=half_for_test", "balance.options.factor=0.25"]).balance
        assert build_weighter(cfg, ["a", "b"]).weights().tolist() == [0.25, 0.25]
        bad = load_config(None, ["balance.weighter=half_for_test", "balance.options.factr=1"]).balance
        with pytest.raises(ValueError, match="balance.options.factr"):
            build_weighter(bad, ["a", "b"])
        with pytest.raises(ValueError, match="registered twice"):
            register_weighter("half_for_test")(Half)
    finally:
        WEIGHTERS.pop("half_for_test")


def test_an_unknown_weighter_and_an_old_flat_key_name_the_key():
    with pytest.raises(ValueError, match="'balance.weighter': 'dwaa' is not one of"):
        build_weighter(load_config(None, ["balance.weighter=dwaa"]).balance, ["a"])
    with pytest.raises(ValueError, match="'balance.dwa_temperature' does not exist.*balance.options"):
        load_config(None, ["balance.dwa_temperature=2"])
