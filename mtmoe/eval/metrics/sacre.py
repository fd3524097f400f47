"""Translation metrics from sacrebleu (the field's reference implementation): corpus chrF and BLEU."""

from __future__ import annotations

import sacrebleu

from mtmoe.data.references import MetricSpec, Reference
from mtmoe.eval.metrics.base import TaskMetric


class ChrF(TaskMetric):
    """sacrebleu's corpus chrF (character n-grams, β = 2), one reference per sample."""

    name = "chrf"

    def score(self, answers: list[str], refs: list[Reference], spec: MetricSpec) -> dict[str, float]:
        """Corpus chrF, 0–100."""
        if not answers:
            return {"score": 0.0}
        return {"score": sacrebleu.corpus_chrf(answers, [[r.answer for r in refs]]).score}


class Bleu(TaskMetric):
    """sacrebleu's corpus BLEU with its default 13a tokenizer, one reference per sample."""

    name = "bleu"

    def score(self, answers: list[str], refs: list[Reference], spec: MetricSpec) -> dict[str, float]:
        """Corpus BLEU, 0–100."""
        if not answers:
            return {"score": 0.0}
        return {"score": sacrebleu.corpus_bleu(answers, [[r.answer for r in refs]]).score}
