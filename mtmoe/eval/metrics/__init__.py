"""Task metrics, one registry: a task declares one by name when it is tokenized.

An entry is one class (a `TaskMetric`) in its own module and one line here. Scores are percentages.
"""

from __future__ import annotations

from mtmoe.data.references import MetricSpec, Reference
from mtmoe.eval.metrics.base import TaskMetric, normalize
from mtmoe.eval.metrics.pass_at_1 import PassAt1
from mtmoe.eval.metrics.sacre import BLEU, CHRF
from mtmoe.eval.metrics.text import Accuracy, ExactMatch

METRICS: dict[str, TaskMetric] = {m.name: m for m in (PassAt1(), CHRF, BLEU, ExactMatch(), Accuracy())}


def get_metric(name: str) -> TaskMetric:
    """The registered metric `name`.

    Raises:
        ValueError: Naming the unknown metric and the known ones.
    """
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; known: {sorted(METRICS)}")
    return METRICS[name]


def check_reference(spec: MetricSpec, ref: Reference) -> None:
    """Refuses a record that the task's declared metric cannot score (ValueError, naming what is missing)."""
    get_metric(spec.name).check(ref, spec)


__all__ = ["METRICS", "MetricSpec", "Reference", "TaskMetric", "check_reference", "get_metric", "normalize"]
