"""Uncertainty weighting (Kendall et al., 2018): L = sum_k exp(-s_k) L_k + s_k, with s_k learned.

The s_k are the weighter's own parameters. Their gradient is closed-form,
d/ds_k = 1 - exp(-s_k) L_k, so they are updated here by SGD from the observed losses instead of
joining the model's optimizer; the fixed point is s_k = log L_k, i.e. w_k = 1 / L_k. The s_k terms
add no gradient to the model, so they are left out of the model loss.

The weights are precisions with an absolute scale (as every loss falls, every weight grows), so the
trainer divides by the number of present tasks, not by the weights' sum (`normalize_by`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from mtmoe.balance.weighters.base import TaskWeighter, register_weighter
from mtmoe.config import check


@dataclasses.dataclass(kw_only=True)
class UncertaintyOptions:
    """Options of `uncertainty`.

    Attributes:
        lr: Step size of the learned log-variances.
    """

    lr: float = 0.05

    def __post_init__(self):
        check(self.lr > 0, "balance.options.lr", "> 0")


@register_weighter("uncertainty", UncertaintyOptions)
class Uncertainty(TaskWeighter):
    """Homoscedastic-uncertainty task weights.

    Args:
        num_tasks: K.
        lr: Step size for the log-variances s_k.
    """

    normalize_by = "task_count"

    def __init__(self, num_tasks: int, lr: float = 0.05, **_: Any):
        super().__init__(num_tasks)
        self.lr = lr
        self.log_var = torch.zeros(num_tasks, dtype=torch.float64)

    def weights(self, counts_X: torch.Tensor | None = None) -> torch.Tensor:
        """exp(-s_k)."""
        return torch.exp(-self.log_var)

    def observe(self, losses_X: torch.Tensor, present_X: torch.Tensor) -> None:
        """One SGD step on the s_k of the tasks present."""
        grad = 1.0 - torch.exp(-self.log_var) * losses_X.double()
        self.log_var = torch.where(present_X, self.log_var - self.lr * grad, self.log_var)

    def state_dict(self) -> dict[str, Any]:
        """The log-variances."""
        return {"log_var": self.log_var.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the log-variances."""
        self.log_var = torch.tensor(state["log_var"], dtype=torch.float64)
