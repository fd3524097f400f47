"""Quality Retaining: the distillation term against hand-computed values, the EMA and teacher snapshots,
exact weight swapping, and a real 2-process run that takes teachers and resumes bit for bit."""

import json
import math

import pytest
import torch
from torch import nn
from training_runs import final, link_checkpoint, losses, records, train_run

from mtmoe.balance.quality_retain import QualityRetainer, distillation_sums, retain_loss

pytestmark = pytest.mark.timeout(400)


def test_distillation_sums_match_a_hand_computed_kl():
    student = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]))
    teacher = torch.log(torch.tensor([[0.25, 0.5, 0.25], [0.1, 0.8, 0.1]]))
    sums = distillation_sums(student, teacher, torch.tensor([1, 1]), num_tasks=3)
    kl0 = 0.25 * math.log(0.25 / 0.5) + 0.5 * math.log(0.5 / 0.25) + 0.25 * math.log(1.0)  # = 0.25 ln 2
    assert sums.tolist() == pytest.approx([0.0, kl0, 0.0], abs=1e-6)


def test_retain_loss_weighs_each_task_by_its_inverse_training_loss():
    kl_sums = torch.tensor([0.0, 3.0, 2.0])
    counts = torch.tensor([5.0, 10.0, 4.0], dtype=torch.float64)
    ce = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    # 2.0 * 4 * (3/10 / 0.5 + 2/4 / 2) = 8 * (0.6 + 0.25)
    assert retain_loss(kl_sums, counts, ce, coef=2.0, grad_scale=4.0).item() == pytest.approx(6.8)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, 2.0]))
        self.frozen = nn.Parameter(torch.tensor([5.0]), requires_grad=False)


def test_ema_and_a_teacher_snapshot_at_each_new_best_after_warmup():
    model = Tiny()
    qr = QualityRetainer(model, num_tasks=2, coef=1.0, ema=0.5, smooth=0.5, warmup=2)
    assert set(qr.ema) == {"w"}  # frozen tensors are shared, not copied
    with torch.no_grad():
        model.w.copy_(torch.tensor([3.0, 4.0]))
    qr.update_ema()
    torch.testing.assert_close(qr.ema["w"], torch.tensor([2.0, 3.0]))
    both = torch.tensor([True, True])
    assert qr.observe_validation(torch.tensor([2.0, 3.0]), both, step=1) == []  # warm-up
    assert qr.observe_validation(torch.tensor([1.0, 5.0]), both, step=2) == [0, 1]  # smoothed 1.5, 4.0
    torch.testing.assert_close(qr.teachers[0]["w"], torch.tensor([2.0, 3.0]))
    assert qr.observe_validation(torch.tensor([1.5, 2.0]), both, step=3) == [1]  # 1.5 (no gain), 3.0
    assert qr.observe_validation(torch.tensor([9.0, 1.0]), torch.tensor([False, True]), step=4) == [1]
    assert qr.smoothed_X.tolist() == pytest.approx([1.5, 2.0])


def test_teacher_weights_are_swapped_in_and_restored_exactly():
    model = Tiny()
    qr = QualityRetainer(model, num_tasks=1, coef=1.0, ema=0.9, smooth=0.0, warmup=0)
    qr.teachers[0] = {"w": torch.tensor([7.0, 8.0])}
    before = model.w.detach().clone()
    with qr.teacher_weights(0):
        assert model.w.tolist() == [7.0, 8.0]
    assert torch.equal(model.w, before)


QR = ["balance.quality_retain=true", "balance.qr_warmup=1", "balance.qr_coef=5.0"]


def test_a_real_run_takes_teachers_distills_and_resumes_bit_exactly(demo_data, tmp_path):
    full = train_run(demo_data, tmp_path / "full", 2, 1, *QR)
    by_step = {r["step"]: r for r in records(full) if "loss" in r}
    assert by_step[1]["qr/teachers"] >= 1
    assert any(k.startswith("val_loss/") for k in by_step[1])
    assert any(by_step[s]["qr/loss"] > 0 for s in range(2, 7))
    state = json.loads((full / "checkpoints" / "step_000003" / "state.json").read_text())
    assert state["quality"]["teachers"]
    resumed = link_checkpoint(full, tmp_path / "resumed", 3)
    train_run(demo_data, resumed, 2, 1, *QR, resume=True)
    a, b = losses(full), losses(resumed)
    assert all(a[s] == b[s] for s in (4, 5, 6)), (a, b)
    for name in ("trainable", "quality"):
        ta, tb = final(full, name), final(resumed, name)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name


def test_validation_losses_are_logged_every_val_every_steps(demo_data, tmp_path):
    run = train_run(demo_data, tmp_path / "run", 1, 1, "train.val_every=2", steps=4, save_every=0)
    logged = [r["step"] for r in records(run) if any(k.startswith("val_loss/") for k in r)]
    assert logged == [2, 4]
