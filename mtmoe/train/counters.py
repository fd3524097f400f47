"""What a run has done so far: kept in checkpoints, logged, and reported in `eval.json`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class RunCounters:
    """Running totals of one run (the same on every rank).

    Attributes:
        wall_s: Seconds spent in training steps.
        tokens: Real tokens trained on, all ranks.
        task_tokens_X: Target tokens per task, all ranks.
        dropped_assignments: Token-expert assignments over capacity, all ranks.
        skipped_steps: Steps skipped for a non-finite loss or gradient.
    """

    wall_s: float
    tokens: int
    task_tokens_X: torch.Tensor
    dropped_assignments: int = 0
    skipped_steps: int = 0

    @classmethod
    def zeros(cls, num_tasks: int) -> RunCounters:
        """Counters of a run that has not started."""
        return cls(wall_s=0.0, tokens=0, task_tokens_X=torch.zeros(num_tasks, dtype=torch.float64))

    def add_step(self, seconds: float, tokens: int, counts_X: torch.Tensor, skipped: bool) -> None:
        """Counts one optimizer step."""
        self.wall_s += seconds
        self.tokens += tokens
        self.task_tokens_X = self.task_tokens_X + counts_X
        self.skipped_steps += int(skipped)

    def to_state(self) -> dict[str, Any]:
        """JSON-able form for checkpoints."""
        return {
            "wall_s": self.wall_s,
            "tokens": self.tokens,
            "task_tokens": self.task_tokens_X.tolist(),
            "dropped_assignments": self.dropped_assignments,
            "skipped_steps": self.skipped_steps,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> RunCounters:
        """Restores `to_state`."""
        return cls(
            wall_s=state["wall_s"],
            tokens=state["tokens"],
            task_tokens_X=torch.tensor(state["task_tokens"], dtype=torch.float64),
            dropped_assignments=state["dropped_assignments"],
            skipped_steps=state["skipped_steps"],
        )
