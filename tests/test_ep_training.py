"""Expert parallelism through the whole training loop, in real gloo processes running the DeepSpeed engine.

- `ep_size` 2 and 4 give the per-step losses and updated weights of `ep_size` 1 on the same global batch,
  dropless and with a capacity factor, under ZeRO-2 and ZeRO-0 (with clipping active).
- A run saved on 4 ranks with `ep_size` 2 resumes on 1 rank (`ep_size` 1) and on 4 ranks (`ep_size` 4),
  with its optimizer state, and continues the uninterrupted loss curve.
- The consolidated fp32 export of an EP checkpoint equals that of the replicated run.
"""

import json
import sys

import pytest
import torch
from conftest import run_cmd
from safetensors.torch import load_file
from training_runs import drops, final, link_checkpoint, losses, train_run

pytestmark = pytest.mark.timeout(400)  # a hung collective fails the test instead of blocking CI


def assert_same_run(a, b, steps=range(1, 7), atol=1e-5):
    la, lb = losses(a), losses(b)
    for s in steps:
        assert la[s] == pytest.approx(lb[s], rel=1e-6), f"step {s}: {la[s]} vs {lb[s]}"
    for name in ("trainable", "optimizer"):
        ta, tb = final(a, name), final(b, name)
        assert ta.keys() == tb.keys()
        for k in ta:
            torch.testing.assert_close(ta[k], tb[k], atol=atol, rtol=1e-4, msg=f"{name}: {k}")


@pytest.fixture(scope="module")
def runs(demo_data_metrics, tmp_path_factory):
    """Trains each (world, ep_size, options) once for the whole module (codegen and translate declare
    metrics, so every run also generates and scores its answers at the end)."""
    demo_data = demo_data_metrics
    root = tmp_path_factory.mktemp("ep_runs")
    cache = {}

    def get(world, ep_size, *extra):
        key = (world, ep_size, *extra)
        if key not in cache:
            name = "_".join(str(x).replace("=", "-").replace(".", "") for x in key)
            cache[key] = train_run(demo_data, root / name, world, ep_size, *extra)
        return cache[key]

    get.root, get.data = root, demo_data
    return get


CAPACITY = "moe.capacity_factor=1.0"


@pytest.mark.parametrize(
    "world,ep_size,extra",
    [
        (2, 2, ()),
        (2, 2, (CAPACITY,)),
        (2, 2, ("parallel.zero_stage=0", "train.grad_clip=0.01")),
        (2, 2, ("parallel.zero_stage=1",)),
        (4, 2, ()),
        (4, 4, (CAPACITY,)),
    ],
    ids=[
        "2proc-dropless",
        "2proc-capacity",
        "2proc-zero0-clipped",
        "2proc-zero1",
        "4proc-ep2-dropless",
        "4proc-ep4-capacity",
    ],
)
def test_expert_parallel_equals_replicated_experts(runs, world, ep_size, extra):
    ep_run, replicated = runs(world, ep_size, *extra), runs(world, 1, *extra)
    assert_same_run(ep_run, replicated)
    eval_ep = json.loads((ep_run / "eval.json").read_text())
    assert eval_ep["train"]["ep_size"] == ep_size
    if CAPACITY in extra:
        assert drops(ep_run) == drops(replicated) > 0, "capacity should drop, the same in both"
        assert eval_ep["train"]["dropped_assignments"] == drops(ep_run)
    else:
        assert drops(ep_run) == 0


def test_generation_metrics_on_expert_parallel_ranks_equal_one_process(runs):
    """Greedy answers and their scores: 2 ranks with `ep_size` 2 (each forward a collective, samples
    strided over ranks) against one process holding every expert."""
    ep_run, single = runs(2, 2), runs(1, 1)
    answers_ep, answers_one = (json.loads((r / "generations.json").read_text()) for r in (ep_run, single))
    assert set(answers_ep) == {"codegen", "translate"}  # the tasks that declared a metric
    assert answers_ep == answers_one
    assert (
        len(answers_ep["translate"]) == 6
    )  # every held-out sample (tests/test_task_metrics.py has varied ones)
    tasks_ep, tasks_one = (json.loads((r / "eval.json").read_text())["tasks"] for r in (ep_run, single))
    for name in answers_ep:
        assert tasks_ep[name]["metric"] == tasks_one[name]["metric"]
        assert tasks_ep[name]["score"] == tasks_one[name]["score"]
    assert "metric" not in tasks_ep["docstring"]  # no metric declared: loss only


@pytest.mark.parametrize("world,ep_size", [(1, 1), (4, 4)], ids=["to-world1-ep1", "to-world4-ep4"])
def test_resume_across_world_and_ep_size_continues_the_run(runs, world, ep_size):
    full = runs(4, 2)
    resumed = link_checkpoint(full, runs.root / f"resumed_w{world}_ep{ep_size}", 3)
    train_run(runs.data, resumed, world, ep_size, resume=True)
    # Same weights and AdamW moments at step 6, and the same losses for steps 4-6.
    assert_same_run(resumed, full, steps=range(4, 7))


def test_resume_without_the_optimizer_state_would_differ(runs):
    """The resume test can fail: zeroed AdamW moments at step 3 change the step-4 update."""
    full = runs(4, 2)
    broken = runs.root / "resumed_zero_moments"
    (broken / "checkpoints" / "step_000003").mkdir(parents=True)
    src = full / "checkpoints" / "step_000003"
    for name in ("trainable.safetensors", "state.json"):
        (broken / "checkpoints" / "step_000003" / name).symlink_to(src / name)
    from safetensors.torch import save_file

    zeros = {k: torch.zeros_like(v) for k, v in load_file(src / "optimizer.safetensors").items()}
    save_file(zeros, broken / "checkpoints" / "step_000003" / "optimizer.safetensors")
    (broken / "checkpoints" / "latest").write_text("step_000003")
    train_run(runs.data, broken, 4, 2, resume=True)
    a, b = final(broken), final(full)
    assert max((a[k] - b[k]).abs().max().item() for k in a) > 1e-4


def test_consolidated_fp32_export_of_an_ep_checkpoint(runs):
    ep_run, replicated = runs(4, 2), runs(4, 1)
    files = []
    for run in (ep_run, replicated):
        out = run / "moe_fp32.safetensors"
        run_cmd([sys.executable, "launch/consolidate.py", "--run", run, "--out", out])
        files.append(load_file(out))
    a, b = files
    assert a.keys() == b.keys() and any(".experts.gate_a" in k for k in a)
    assert all(t.dtype == torch.float32 for t in a.values())
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)
    experts = next(k for k in a if k.endswith("experts.gate_a"))
    assert a[experts].shape[0] == 4  # every expert, though each rank of the EP run held 2
