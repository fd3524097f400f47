"""Router fading: the blend at block level, the schedule, an exact export after a faded run, and resume
in the middle of a fade."""

import json
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import run_cmd
from test_block import make_block
from training_runs import final, link_checkpoint, losses, train_run

from mtmoe.config import load_config
from mtmoe.train.fading import fade_alpha, fade_start

pytestmark = pytest.mark.timeout(400)


def test_a_faded_block_is_its_merged_expert_and_blends_linearly():
    block = make_block(16, 32, 4, 2, 4)
    shares = torch.tensor([0.1, 0.2, 0.3, 0.4])
    block.fade_shares_E.copy_(shares)
    x = torch.randn(2, 5, 16)
    routed = block(x)
    w = {
        p: getattr(block.base, f"{p}_proj").weight
        + torch.einsum("e,eoi->oi", shares, block.experts.weight_delta(p))
        for p in ("gate", "up", "down")
    }
    merged = (F.silu(x @ w["gate"].t()) * (x @ w["up"].t())) @ w["down"].t()
    block.context.fade_alpha = 0.0
    torch.testing.assert_close(block(x), merged, atol=1e-5, rtol=1e-4)
    block.context.fade_alpha = 0.3
    torch.testing.assert_close(block(x), 0.3 * routed + 0.7 * merged, atol=1e-5, rtol=1e-4)


def test_fade_schedules():
    cfg = load_config(None, ["train.steps=10", "moe.fade_fraction=0.4"])
    assert fade_start(cfg) == 6
    assert [fade_alpha(cfg, s) for s in (1, 6, 7, 8, 10)] == pytest.approx([1, 1, 0.75, 0.5, 0])
    cos = load_config(None, ["train.steps=10", "moe.fade_fraction=0.4", "moe.fade_schedule=cosine"])
    assert [fade_alpha(cos, s) for s in (6, 8, 10)] == pytest.approx([1, 0.5, 0])
    assert fade_alpha(load_config(None, ["train.steps=10"]), 10) == 1.0
    with pytest.raises(ValueError, match="moe.fade_fraction"):
        load_config(None, ["moe.fade_fraction=0.5", "parallel.ep_size=2"])


def _train_and_export(demo_data, run, *extra):
    run_cmd([sys.executable, "launch/train.py", "--config", "launch/recipes/tiny.yaml",
             f"data.tokenized={demo_data}", f"train.output_dir={run}", "train.steps=6", *extra])  # fmt: skip
    run_cmd([sys.executable, "launch/export.py", "--run", run, "--out", run / "dense"])
    return json.loads((run / "dense" / "export_report.json").read_text())["tasks"]


def test_after_fading_the_export_is_exactly_the_trained_model(demo_data, tmp_path):
    faded = _train_and_export(demo_data, tmp_path / "faded", "moe.fade_fraction=0.5")
    trained = json.loads((tmp_path / "faded" / "eval.json").read_text())["tasks"]
    for name, t in faded.items():
        assert t["export_loss"] == pytest.approx(t["moe_loss"], abs=1e-5)
        assert t["moe_loss"] == pytest.approx(trained[name]["loss"], abs=1e-5)
        assert t["gain_kept"] == pytest.approx(1.0, abs=1e-3)
    plain = _train_and_export(demo_data, tmp_path / "plain")  # the control: merging without fading loses
    assert max(abs(t["export_loss"] - t["moe_loss"]) for t in plain.values()) > 1e-4


def test_resume_in_the_middle_of_a_fade_is_exact(demo_data, tmp_path):
    fade = "moe.fade_fraction=0.5"
    full = train_run(demo_data, tmp_path / "full", 2, 1, fade, save_every=4)
    state = json.loads((full / "checkpoints" / "step_000004" / "state.json").read_text())
    assert state["fade_shares"]  # fading had started at step 4
    resumed = link_checkpoint(full, tmp_path / "resumed", 4)
    train_run(demo_data, resumed, 2, 1, fade, resume=True, save_every=4)
    a, b = losses(full), losses(resumed)
    assert all(a[s] == b[s] for s in (5, 6)), (a, b)
    ta, tb = final(full), final(resumed)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
