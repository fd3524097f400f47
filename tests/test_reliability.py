"""Reliability with real processes: bit-exact resume, NaN steps skipped on every rank, SIGTERM
preemption of a launched 2-process job, kill -9 in the middle of a save, and checkpoint retention."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, run_cmd
from training_runs import TINY, final, link_checkpoint, losses, records, train_run

from mtmoe.parallel.dist import free_port

pytestmark = pytest.mark.timeout(400)


COBA = ("balance.weighter=coba", "balance.options.warmup=1", "balance.options.history=3")


@pytest.mark.parametrize("world,weighter", [(1, ()), (2, ()), (2, COBA)], ids=["1", "2", "2-coba"])
def test_resume_is_bit_exact(demo_data, tmp_path, world, weighter):
    full = train_run(demo_data, tmp_path / "full", world, 1, *weighter)
    resumed = link_checkpoint(full, tmp_path / "resumed", 3)
    train_run(demo_data, resumed, world, 1, *weighter, resume=True)
    a, b = losses(full), losses(resumed)
    assert sorted(b) == [4, 5, 6]
    assert all(a[s] == b[s] for s in (4, 5, 6)), (a, b)
    wa, wb = ({r["step"]: r for r in records(run) if "loss" in r} for run in (full, resumed))
    for s in (4, 5, 6):
        weights = {k: v for k, v in wa[s].items() if k.startswith("weight/")}
        assert weights and weights == {k: wb[s][k] for k in weights}
    if weighter:
        assert any(v != 1.0 for v in weights.values())  # CoBa really moved the weights
    for name in ("trainable", "optimizer"):
        ta, tb = final(full, name), final(resumed, name)
        assert all(torch.equal(ta[k], tb[k]) for k in ta), name
    ea, eb = (json.loads((r / "eval.json").read_text())["tasks"] for r in (full, resumed))
    assert ea == eb


@pytest.mark.parametrize("zero", [0, 2])
def test_a_nan_on_one_rank_skips_the_step_on_every_rank(demo_data, tmp_path, monkeypatch, zero):
    monkeypatch.setenv("MTMOE_FAULT_NAN_STEPS", "3")
    monkeypatch.setenv("MTMOE_FAULT_NAN_RANK", "1")
    run = train_run(demo_data, tmp_path / "run", 2, 1, f"parallel.zero_stage={zero}", steps=4, save_every=1)
    # Step 3 changed nothing: weights and AdamW state after it equal those after step 2.
    for name in ("trainable", "optimizer"):
        before, after = final(run, name, step=2), final(run, name, step=3)
        assert all(torch.equal(before[k], after[k]) for k in before), name
    after4 = final(run, "trainable", step=4)
    assert any(not torch.equal(after4[k], final(run, "trainable", step=3)[k]) for k in after4)
    assert all(torch.isfinite(t).all() for t in after4.values())
    by_step = {r["step"]: r for r in records(run) if "loss" in r}
    assert [by_step[s]["skipped_steps"] for s in (1, 2, 3, 4)] == [0, 0, 1, 1]
    assert json.loads((run / "eval.json").read_text())["train"]["skipped_steps"] == 1


def test_too_many_nan_steps_in_a_row_stop_the_run(demo_data, tmp_path, monkeypatch):
    monkeypatch.setenv("MTMOE_FAULT_NAN_STEPS", "2,3,4")
    # The checkpoints of the skipped steps 2 and 3 hold the unchanged (good) weights of step 1.
    with pytest.raises(Exception, match=r"3 steps in a row \(up to step 4\).*checkpoint: \S*step_000003"):
        train_run(demo_data, tmp_path / "run", 2, 1, "train.max_bad_steps=3", steps=6, save_every=1)


def _launch(args, log):
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    return subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, text=True
    )


def _wait_for(predicate, proc, timeout=240):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, "the run ended before the test could interrupt it"
        assert time.time() < deadline, "timed out waiting for the run"
        time.sleep(0.2)


def _steps_logged(run):
    path = run / "metrics.jsonl"
    return [r["step"] for r in records(run) if "loss" in r] if path.exists() else []


def test_sigterm_to_a_launched_two_process_job_saves_and_exits(demo_data, tmp_path):
    run = tmp_path / "run"
    common = ["launch/train.py", "--config", TINY, f"data.tokenized={demo_data}", f"train.output_dir={run}"]
    port = str(free_port())
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    with open(tmp_path / "log.txt", "w") as log:
        proc = _launch([*torchrun, *common, "train.steps=100000", "train.save_every=0"], log)
        _wait_for(lambda: len(_steps_logged(run)) >= 2, proc)
        os.kill(proc.pid, signal.SIGTERM)  # to the launcher, as a scheduler would; it signals the workers
        proc.wait(timeout=120)
    out = (tmp_path / "log.txt").read_text()
    assert "preempted (SIGTERM) after step" in out, out[-3000:]
    tag = (run / "checkpoints" / "latest").read_text()
    step = int(tag.split("_")[1])
    assert step >= 2 and (run / "checkpoints" / tag / "trainable.safetensors").exists()
    assert max(_steps_logged(run)) == step  # every rank finished the same step, then stopped
    run_cmd([*torchrun, *common, f"train.steps={step + 2}", "--resume"])
    assert _steps_logged(run)[-2:] == [step + 1, step + 2]


def test_kill_9_during_a_save_leaves_a_resumable_run(demo_data, tmp_path):
    run = tmp_path / "run"
    common = [
        sys.executable,
        "launch/train.py",
        "--config",
        TINY,
        f"data.tokenized={demo_data}",
        f"train.output_dir={run}",
        "train.steps=6",
        "train.save_every=2",
        "train.keep_checkpoints=2",
    ]
    partial = run / "checkpoints" / ".step_000004.partial"
    with open(tmp_path / "log.txt", "w") as log:
        os.environ["MTMOE_FAULT_SAVE_PAUSE"] = "4:120"
        try:
            proc = _launch(common, log)
        finally:
            del os.environ["MTMOE_FAULT_SAVE_PAUSE"]
        _wait_for(lambda: (partial / "state.json").exists(), proc)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    root = run / "checkpoints"
    assert (root / "latest").read_text() == "step_000002"
    assert not (root / "step_000004").exists() and partial.exists()
    run_cmd([*common, "--resume"])
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000004", "step_000006"]
    assert _steps_logged(run)[-4:] == [3, 4, 5, 6]


def test_a_recipe_pointing_at_missing_data_names_the_key(tmp_path):
    with pytest.raises(AssertionError, match="data.tokenized"):
        run_cmd(
            [sys.executable, "launch/train.py", "--config", TINY, f"data.tokenized={tmp_path / 'nowhere'}"]
        )
