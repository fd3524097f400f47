"""The export reuses a run's own final scores of the MoE only when they are of the exported checkpoint."""

from __future__ import annotations

import json

import pytest

from mtmoe.export import pipeline as export_cli


def write_run(run, step=8, tag="step_000008", tasks=None, answers=None):
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text(tag)
    tasks = tasks or {"codegen": {"loss": 0.9, "tokens": 10, "metric": "pass@1", "score": 50.0, "samples": 2}}
    (run / "eval.json").write_text(json.dumps({"step": step, "tasks": tasks}))
    (run / "generations.json").write_text(json.dumps(answers or {"codegen": ["return 1", "return 2"]}))


def test_scores_of_the_exported_step_are_reused(tmp_path):
    write_run(tmp_path)
    got = export_cli.run_scores(tmp_path, ["codegen"])
    assert got == {
        "codegen": {"metric": "pass@1", "score": 50.0, "samples": 2, "answers": ["return 1", "return 2"]}
    }


@pytest.mark.parametrize(
    "change",
    [
        {"tag": "step_000010"},  # resumed past the evaluated step
        {"tasks": {"codegen": {"loss": 0.9, "tokens": 10}}},  # loss only
        {"answers": {"translate": ["Hallo"]}},  # no answers for the task
    ],
)
def test_anything_else_is_generated_again(tmp_path, change):
    write_run(tmp_path, **change)
    assert export_cli.run_scores(tmp_path, ["codegen"]) is None


def test_a_run_without_eval_json_is_generated_again(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step_000008")
    assert export_cli.run_scores(tmp_path, ["codegen"]) is None
