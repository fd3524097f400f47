"""Fixed weights."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from mtmoe.balance.weighters.base import TaskWeighter, register_weighter


@register_weighter("uniform")
class Uniform(TaskWeighter):
    """Every task weighs 1: MFTCoder's data-balanced loss (the default)."""


@register_weighter("token_mean")
class TokenMean(TaskWeighter):
    """Every token weighs the same, whatever its task: sum_k S_k / sum_k N_k.

    This is the plain loss most trainers use, where big tasks dominate; it is here as a baseline.
    With the trainer's sum_k w_k S_k / N_k / sum_k w_k, that is w_k ∝ N_k; they are scaled to
    w_k = K_present · N_k / sum_j N_j, so that they average 1 over the present tasks, like the others.
    """

    def weights(self, counts_X: torch.Tensor | None = None) -> torch.Tensor:
        """K_present · N_k / sum N over the coming global batch."""
        if counts_X is None:
            raise ValueError("token_mean weights need the batch's per-task token counts")
        counts = counts_X.double()
        return (counts > 0).sum() * counts / counts.sum().clamp_min(1.0)


@dataclasses.dataclass(kw_only=True)
class StaticOptions:
    """Options of `static`.

    Attributes:
        weights: {task: weight}; unlisted tasks weigh 1.
    """

    weights: dict[str, float] = dataclasses.field(default_factory=dict)


@register_weighter("static", StaticOptions)
class Static(TaskWeighter):
    """Weights given in the recipe, per task name.

    Args:
        num_tasks: K.
        task_names: Names of the K tasks, in id order.
        static_weights: {task name: weight}; tasks not listed weigh 1.

    Raises:
        ValueError: For an unknown task name or a negative weight (naming `balance.options.weights`).
    """

    @classmethod
    def from_options(cls, task_names: list[str], options: StaticOptions) -> Static:
        """The weights of `options` over `task_names`."""
        return cls(len(task_names), task_names, options.weights)

    def __init__(self, num_tasks: int, task_names: list[str], static_weights: dict[str, float], **_: Any):
        super().__init__(num_tasks)
        unknown = sorted(set(static_weights) - set(task_names))
        if unknown:
            raise ValueError(
                f"config key 'balance.options.weights': unknown task(s) {unknown}; known: {task_names}"
            )
        if any(float(w) < 0 for w in static_weights.values()):
            raise ValueError("config key 'balance.options.weights': weights must be >= 0")
        self._w = torch.tensor([float(static_weights.get(n, 1.0)) for n in task_names], dtype=torch.float64)

    def weights(self, counts_X: torch.Tensor | None = None) -> torch.Tensor:
        """The configured weights."""
        return self._w.clone()
