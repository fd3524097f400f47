"""Scoring a model on every task that declared a metric: the held-out prompts, greedy answers, scores.

Callers (the training loop, `launch/export.py`, `launch/report.py`) pass the model's decoding step; this
module finds the tasks with a metric in the manifest, their references and specs.
"""

from __future__ import annotations

from typing import Any

from mtmoe.data.shards import Manifest, open_references, open_shard
from mtmoe.eval.generation import StepFn, generation_metrics
from mtmoe.eval.metrics import get_metric


def has_metrics(manifest: Manifest, names: list[str]) -> bool:
    """True if any of the tasks `names` declared a metric."""
    return any(manifest.task(n).metric is not None for n in names)


def score_tasks(
    step: StepFn, manifest: Manifest, names: list[str], tokenizer, max_samples: int = 0, **settings: Any
) -> dict[str, dict[str, Any]]:
    """Each named task's declared metric on greedy answers to its held-out prompts.

    Tasks without a metric are left out. `settings` (batch size, rank, world, device, progress) and the
    result are those of `mtmoe.eval.generation.generation_metrics`; every rank must call this together.
    """
    tasks = []
    for name in names:
        spec = manifest.task(name).metric_spec
        if spec is not None:
            tasks.append((open_shard(manifest, name, "eval"), open_references(manifest, name), spec))
    if not tasks:
        return {}
    score = lambda metric: get_metric(metric).score  # noqa: E731
    return generation_metrics(step, tasks, score, tokenizer, max_samples, **settings)


def metric_summary(scored: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The scores without the answers, for eval.json and reports."""
    return {name: {k: v for k, v in r.items() if k != "answers"} for name, r in scored.items()}
