"""The task-metric contract: what a metric sees, what it checks at tokenization, what it returns.

`Reference` and `MetricSpec` live in the data layer (`mtmoe.data.references`), which stores them.
"""

from __future__ import annotations

import unicodedata
from typing import ClassVar

from mtmoe.data.references import MetricSpec, Reference


class TaskMetric:
    """Base of every metric: a name, `check` for each record at tokenization, and `score`.

    Scores are percentages (0–100), higher is better.
    """

    name: ClassVar[str]

    def check(self, ref: Reference, spec: MetricSpec) -> None:
        """Refuses a record this metric cannot score (ValueError; the caller adds `file:line`)."""

    def score(self, answers: list[str], refs: list[Reference], spec: MetricSpec) -> dict[str, float]:
        """{"score": percentage, ...details}, over all samples (no sample scores 0)."""
        raise NotImplementedError


def normalize(text: str) -> str:
    """The text compared by `exact_match` and `accuracy`: NFKC, case-folded, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())
