"""Export options: expert selection by utilization, pruning, merge scaling, heatmap PNGs, PEFT adapters,
and the export command's report on a real (tiny) run."""

import json
import sys

import pytest
import torch
from conftest import run_cmd
from test_export import _model

from mtmoe.config import load_config
from mtmoe.eval.heatmap import figure_pixels, heatmap_figure, task_shares, write_heatmaps
from mtmoe.eval.utilization import expert_shares, routing_summary
from mtmoe.export.dense import fold_to_dense, merged_deltas
from mtmoe.export.methods import MergeSpec
from mtmoe.export.peft_adapters import lora_factors, write_adapter
from mtmoe.export.prune import keep_experts, renormalise
from mtmoe.model.moe_lm import build_base
from mtmoe.model.walk import moe_blocks

UTIL = {
    "tasks": ["a", "b"],
    "num_experts": 4,
    "layers": {
        "0": {"mass": [[4.0, 0.0, 3.0, 1.0], [0.0, 6.0, 2.0, 0.0]], "tokens": [[1, 1, 1, 1], [1, 1, 1, 1]]},
        "1": {"mass": [[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]], "tokens": [[0, 0, 0, 0], [4, 4, 4, 4]]},
    },
}


def test_expert_shares_over_all_tasks_or_one():
    s = expert_shares(UTIL)
    torch.testing.assert_close(s[0], torch.tensor([4.0, 6.0, 5.0, 1.0], dtype=torch.float64) / 16)
    torch.testing.assert_close(
        expert_shares(UTIL, "a")[0], torch.tensor([0.5, 0.0, 0.375, 0.125], dtype=torch.float64)
    )
    torch.testing.assert_close(
        expert_shares(UTIL, "a")[1], torch.full((4,), 0.25, dtype=torch.float64)
    )  # saw nothing
    with pytest.raises(ValueError, match="--task 'c'"):
        expert_shares(UTIL, "c")


def test_pruning_keeps_the_most_used_experts_or_a_seeded_random_set():
    s = expert_shares(UTIL)
    assert keep_experts(s, 2) == {0: [1, 2], 1: [0, 1]}  # layer 1 ties: lower ids first
    r1, r2 = keep_experts(s, 2, "random", seed=3), keep_experts(s, 2, "random", seed=3)
    assert r1 == r2 and all(len(v) == 2 for v in r1.values())
    torch.testing.assert_close(
        renormalise(s, {0: [1, 2], 1: [0, 1]})[0], torch.tensor([0, 6 / 11, 5 / 11, 0], dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="--prune 5"):
        keep_experts(s, 5)
    with pytest.raises(ValueError, match="--prune-by"):
        keep_experts(s, 2, "magic")


def _base():
    """The frozen base that `_model` injects into (tiny-llama is seeded by train.seed)."""
    block = next(iter(moe_blocks(_model().lm).values()))
    cfg = load_config(
        None,
        [
            "model.base=tiny-llama",
            "model.tiny={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2,"
            " num_attention_heads: 4, num_key_value_heads: 2}",
        ],
    )
    base = build_base(cfg, 64)
    assert torch.equal(base.model.layers[0].mlp.up_proj.weight, block.base.up_proj.weight)
    return base


def _trained_like():
    model = _model()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    return model


def test_pruned_average_uses_only_the_kept_experts_with_renormalised_shares():
    model = _trained_like()
    shares = {0: torch.tensor([0.1, 0.2, 0.3, 0.4]), 1: torch.full((4,), 0.25)}
    kept = {0: [1, 3], 1: [0, 1, 2, 3]}
    deltas = merged_deltas(model, shares, kept)
    block = moe_blocks(model.lm)[0]
    dw = block.experts.weight_delta("up").double()
    torch.testing.assert_close(deltas["model.layers.0.mlp.up_proj"], (0.2 * dw[1] + 0.4 * dw[3]) / 0.6)


def test_summing_methods_default_to_the_average_scale():
    model = _trained_like()
    avg = merged_deltas(model, None)
    for method in ("task_arithmetic", "dare"):
        spec = MergeSpec.of(method, **({"drop": 0.0} if method == "dare" else {}))
        other = merged_deltas(model, None, spec=spec)
        for k in avg:
            torch.testing.assert_close(other[k], avg[k])
    with pytest.raises(ValueError, match="--merge: 'magic' is not one of"):
        merged_deltas(model, None, spec=MergeSpec("magic"))
    with pytest.raises(ValueError, match="--drop: not an option of --merge ties"):
        MergeSpec.of("ties", drop=0.3)
    with pytest.raises(ValueError, match="--density"):
        MergeSpec.of("ties", density=1.5)


def test_heatmap_draws_the_task_shares_and_writes_pngs(tmp_path):
    shares = task_shares(UTIL, "0")
    torch.testing.assert_close(shares.sum(1), torch.ones(2, dtype=torch.float64))
    fig = heatmap_figure(shares, UTIL["tasks"], "layer 0")
    (image,) = fig.axes[0].images
    assert image.get_array().tolist() == shares.tolist()  # cell (task, expert) is its share
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == UTIL["tasks"]
    pixels = figure_pixels(fig)  # what wandb gets
    assert pixels.dtype.name == "uint8" and pixels.shape[2] == 3 and pixels.min() < 100  # the dark cells
    paths = write_heatmaps(UTIL, tmp_path)
    assert [p.name for p in paths] == [f"L{int(layer):02d}.png" for layer in sorted(UTIL["layers"], key=int)]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_routing_summary_of_even_and_collapsed_layers():
    util = {
        "tasks": ["a"],
        "num_experts": 2,
        "layers": {
            "0": {"tokens": [[5.0, 5.0]], "mass": [[1.0, 1.0]]},
            "3": {"tokens": [[8.0, 0.0]], "mass": [[1.0, 0.0]]},
        },
    }
    got = routing_summary(util)
    assert got["routing/L00/max_load"] == 1.0 and got["routing/L00/cv"] == 0.0
    assert got["routing/L00/entropy"] == pytest.approx(1.0)
    assert got["routing/L03/max_load"] == 2.0 and got["routing/L03/cv"] == 1.0
    assert got["routing/L03/entropy"] == pytest.approx(0.0, abs=1e-9)
    assert got["routing/max_load"] == 1.5


def test_svd_factors_reproduce_a_low_rank_delta():
    torch.manual_seed(0)
    delta = torch.randn(12, 3, dtype=torch.float64) @ torch.randn(3, 10, dtype=torch.float64)
    a, b = lora_factors(delta, 3)
    torch.testing.assert_close(b @ a, delta)
    a2, b2 = lora_factors(delta, 1)
    assert a2.shape == (1, 10) and torch.linalg.matrix_rank(b2 @ a2) == 1


def test_peft_adapter_on_the_base_reproduces_the_dense_export(tmp_path):
    from peft import PeftModel

    model = _trained_like()
    deltas = merged_deltas(model, None)
    write_adapter(_base(), deltas, rank=16, out=tmp_path / "adapter")  # 4 experts x rank 4 = 16
    base = _base()  # the plain base model: no mtmoe module in it
    served = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    dense = fold_to_dense(model, None).eval()
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(
            served(input_ids=ids).logits, dense(input_ids=ids).logits, atol=1e-4, rtol=1e-4
        )


def test_export_command_reports_the_gain_kept_and_writes_adapters(demo_data, tmp_path):
    run = tmp_path / "run"
    run_cmd([sys.executable, "launch/train.py", "--config", "launch/recipes/tiny.yaml",
             f"data.tokenized={demo_data}", f"train.output_dir={run}"])  # fmt: skip
    assert sorted(p.name for p in (run / "utilization").iterdir()) == ["L00.png", "L01.png"]
    out = tmp_path / "export"
    run_cmd([sys.executable, "launch/export.py", "--run", run, "--out", out, "--task", "codegen",
             "--prune", "2", "--merge", "ties", "--density", "0.5", "--peft-rank", "8"])  # fmt: skip
    report = json.loads((out / "export_report.json").read_text())
    assert report["options"]["task"] == "codegen" and report["options"]["merge"]["method"] == "ties"
    assert all(len(v) == 2 for v in report["options"]["kept_experts"].values())
    for t in report["tasks"].values():
        expected = (t["base_loss"] - t["export_loss"]) / (t["base_loss"] - t["moe_loss"])
        assert t["gain_kept"] == pytest.approx(expected)
    assert sorted(p.name for p in (out / "adapters").iterdir()) == [
        "all",
        "codegen",
        "docstring",
        "translate",
    ]
    assert (out / "adapters" / "codegen" / "adapter_config.json").exists()
    ada = tmp_path / "ada"
    run_cmd([sys.executable, "launch/export.py", "--run", run, "--out", ada, "--merge", "adamerging",
             "--ada-steps", "3"])  # fmt: skip
    merge = json.loads((ada / "export_report.json").read_text())["options"]["merge"]
    assert merge["method"] == "adamerging" and set(merge["lambda"]) == {"0", "1"}
    assert merge["entropy_after"] <= merge["entropy_before"] + 1e-6
