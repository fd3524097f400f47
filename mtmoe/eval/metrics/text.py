"""Metrics on normalised text: `exact_match` and `accuracy` over a declared label set."""

from __future__ import annotations

from mtmoe.data.references import MetricSpec, Reference
from mtmoe.eval.metrics.base import TaskMetric, normalize


def _percent(hits: int, n: int) -> float:
    return 100.0 * hits / n if n else 0.0


class ExactMatch(TaskMetric):
    """The share of answers equal to their reference after `normalize`."""

    name = "exact_match"

    def score(self, answers: list[str], refs: list[Reference], spec: MetricSpec) -> dict[str, float]:
        """Percentage of exact matches."""
        hits = sum(normalize(p) == normalize(r.answer) for p, r in zip(answers, refs, strict=True))
        return {"score": _percent(hits, len(answers))}


class Accuracy(TaskMetric):
    """Classification accuracy over the task's label set.

    An answer counts as the label it equals after `normalize`; an answer that is no label is wrong
    (and counted as `invalid`).
    """

    name = "accuracy"

    def check(self, ref: Reference, spec: MetricSpec) -> None:
        """The task needs a label set, and the reference answer must be one of its labels."""
        if not spec.labels:
            raise ValueError("accuracy needs the task's label set (tokenize_tasks.py --labels NAME=a,b,...)")
        if normalize(ref.answer) not in {normalize(label) for label in spec.labels}:
            raise ValueError(f"the answer {ref.answer!r} is none of the labels {list(spec.labels)}")

    def score(self, answers: list[str], refs: list[Reference], spec: MetricSpec) -> dict[str, float]:
        """Percentage correct, and the percentage of answers that were no label."""
        labels = {normalize(label) for label in spec.labels}
        hits = invalid = 0
        for p, r in zip(answers, refs, strict=True):
            guess = normalize(p)
            invalid += guess not in labels
            hits += guess in labels and guess == normalize(r.answer)
        n = len(answers)
        return {"score": _percent(hits, n), "invalid": _percent(invalid, n)}
