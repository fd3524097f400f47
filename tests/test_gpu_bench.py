"""The step benchmark's prepared GPU mode runs end to end on CPU (tiny config), and its objective check
bites."""

import pytest

from benchmarks import cli
from benchmarks.step import gpu as gb


def test_gpu_bench_runs_on_cpu_and_counts_what_it_times():
    result = cli.main("gpu", gb.MODE, ["--configs", "tiny", "--device", "cpu", "--quick"])
    r = result["configs"]["tiny"]
    losses = r["losses_fresh_adapters"]
    assert losses["peft_lora_r16"] == pytest.approx(losses["frozen_floor"], rel=1e-4)
    # the floor computes no weight grads and no adapters: fewer FLOPs than either adapted step
    assert 0 < r["flops"]["frozen_floor"] < min(r["flops"]["mtmoe"], r["flops"]["peft_lora_r16"])
    assert all(len(t) == 2 and min(t) > 0 for t in r["per_round_s"].values())
    assert all(0 < m < 2 for m in r["mfu_vs_matmul"].values())
    table = gb.render_markdown(result)
    assert table.count("| tiny |") == 3


def test_objective_check_refuses_a_step_with_another_loss():
    steps = {"mtmoe": lambda: 2.0, "peft_lora_r16": lambda: 2.5, "frozen_floor": lambda: 2.0}
    with pytest.raises(AssertionError):
        gb.check_objective(steps, "float32")
    steps["peft_lora_r16"] = lambda: 2.0
    assert gb.check_objective(steps, "float32")["mtmoe"] == 2.0
