"""Translation metrics from sacrebleu (the field's reference implementation): corpus chrF and BLEU."""

from __future__ import annotations

from collections.abc import Callable

import sacrebleu

from mtmoe.data.references import MetricSpec, Reference
from mtmoe.eval.metrics.base import TaskMetric


class CorpusScore(TaskMetric):
    """A sacrebleu corpus score with its default settings, one reference per sample.

    Args:
        name: The metric's registry name.
        corpus_score: `sacrebleu.corpus_chrf` (character n-grams, β = 2) or `sacrebleu.corpus_bleu`
            (13a tokenizer).
    """

    def __init__(self, name: str, corpus_score: Callable):
        self.name, self._corpus_score = name, corpus_score

    def score(self, answers: list[str], refs: list[Reference], spec: MetricSpec) -> dict[str, float]:
        """The corpus score, 0–100 (0 with no sample)."""
        if not answers:
            return {"score": 0.0}
        return {"score": self._corpus_score(answers, [[r.answer for r in refs]]).score}


CHRF = CorpusScore("chrf", sacrebleu.corpus_chrf)
BLEU = CorpusScore("bleu", sacrebleu.corpus_bleu)
