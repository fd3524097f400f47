"""Metrics on normalised text: `exact_match` and `accuracy` over a declared label set."""

from __future__ import annotations

import re

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


def label_of(answer: str, labels: tuple[str, ...]) -> str | None:
    """The label an answer gives, or None.

    The label it equals after `normalize`, else the only label it names as a whole word ("This text is
    in German." gives German); None when it names none or several.
    """
    norm = {normalize(label): label for label in labels}
    text = normalize(answer)
    if text in norm:
        return norm[text]
    named = [label for key, label in norm.items() if re.search(rf"(?<!\w){re.escape(key)}(?!\w)", text)]
    return named[0] if len(named) == 1 else None


class Accuracy(TaskMetric):
    """Classification accuracy over the task's label set.

    An answer counts as the label it gives (`label_of`); an answer that gives no label, or several, is
    wrong, and counted as `invalid`.
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
        hits = invalid = 0
        for p, r in zip(answers, refs, strict=True):
            guess = label_of(p, spec.labels)
            invalid += guess is None
            hits += guess is not None and normalize(guess) == normalize(r.answer)
        n = len(answers)
        return {"score": _percent(hits, n), "invalid": _percent(invalid, n)}
