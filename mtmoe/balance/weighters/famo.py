"""FAMO, Fast Adaptive Multitask Optimization (Liu et al., 2023).

Task logits ξ give z = softmax(ξ). The model's update weighs task k by w_k = c * z_k / L_k, with
c = (sum_j z_j / L_j)^-1: it descends sum_k z_k log L_k. After each step the logits take an Adam step
on δ = J^T (log L(t-1) - log L(t)), J = diag(z) - z z^T, plus weight decay γ ξ:  ξ ← ξ - lr·(Adam(δ) + γ ξ).
A task whose log-loss fell the most loses weight; one that stalled gains it.

Memory is O(K) and there is no extra forward: the "after" loss is the next step's loss (on another
batch), and the 1/L_k scale uses the previous step's loss, so every weight is known before the forward.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from mtmoe.balance.weighters.base import TaskWeighter, register_weighter
from mtmoe.config import check


@dataclasses.dataclass(kw_only=True)
class FAMOOptions:
    """Options of `famo`.

    Attributes:
        lr: Step size of FAMO's task logits (the paper's β).
        weight_decay: FAMO's γ.
    """

    lr: float = 0.025
    weight_decay: float = 0.001

    def __post_init__(self):
        check(self.lr > 0, "balance.options.lr", "> 0")
        check(self.weight_decay >= 0, "balance.options.weight_decay", ">= 0")


@register_weighter("famo", FAMOOptions)
class FAMO(TaskWeighter):
    """FAMO task weights.

    Args:
        num_tasks: K.
        lr: Step size of the task logits (the paper's β = 0.025).
        weight_decay: γ (the paper's 0.001).
        min_loss: Floor on losses before taking logs.
    """

    def __init__(
        self, num_tasks: int, lr: float = 0.025, weight_decay: float = 0.001, min_loss: float = 1e-8, **_: Any
    ):
        super().__init__(num_tasks)
        self.lr, self.weight_decay, self.min_loss = lr, weight_decay, min_loss
        self.logits = torch.zeros(num_tasks, dtype=torch.float64)
        self.adam_m = torch.zeros(num_tasks, dtype=torch.float64)
        self.adam_v = torch.zeros(num_tasks, dtype=torch.float64)
        self.adam_t = 0
        self.last_log_loss = torch.full((num_tasks,), float("nan"), dtype=torch.float64)

    def z(self) -> torch.Tensor:
        """softmax(ξ)."""
        return torch.softmax(self.logits, dim=0)

    def weights(self, counts_X: torch.Tensor | None = None) -> torch.Tensor:
        """K * c * z_k / L_k (times K so that equal z and equal losses give weights of 1)."""
        z = self.z()
        if torch.isnan(self.last_log_loss).any():
            return self.num_tasks * z
        inv_loss = torch.exp(-self.last_log_loss)
        return self.num_tasks * z * inv_loss / (z * inv_loss).sum()

    def observe(self, losses_X: torch.Tensor, present_X: torch.Tensor) -> None:
        """Updates ξ from the change of log-loss since the last step (tasks present in both)."""
        log_loss = torch.log(losses_X.double().clamp_min(self.min_loss))
        both = present_X & ~torch.isnan(self.last_log_loss)
        if both.any():
            decrease = torch.where(both, self.last_log_loss - log_loss, torch.zeros_like(log_loss))
            z = self.z()
            jacobian = torch.diag(z) - torch.outer(z, z)
            self._adam_step(jacobian.t() @ decrease)
        self.last_log_loss = torch.where(present_X, log_loss, self.last_log_loss)

    def _adam_step(self, grad: torch.Tensor) -> None:
        b1, b2, eps = 0.9, 0.999, 1e-8
        self.adam_t += 1
        self.adam_m = b1 * self.adam_m + (1 - b1) * grad
        self.adam_v = b2 * self.adam_v + (1 - b2) * grad * grad
        m_hat = self.adam_m / (1 - b1**self.adam_t)
        v_hat = self.adam_v / (1 - b2**self.adam_t)
        self.logits = self.logits - self.lr * (m_hat / (v_hat.sqrt() + eps) + self.weight_decay * self.logits)

    def state_dict(self) -> dict[str, Any]:
        """Logits, Adam moments and the last log-losses."""
        return {
            "logits": self.logits.tolist(),
            "adam_m": self.adam_m.tolist(),
            "adam_v": self.adam_v.tolist(),
            "adam_t": self.adam_t,
            "last_log_loss": [x if not math.isnan(x) else None for x in self.last_log_loss.tolist()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores `state_dict`."""
        self.logits = torch.tensor(state["logits"], dtype=torch.float64)
        self.adam_m = torch.tensor(state["adam_m"], dtype=torch.float64)
        self.adam_v = torch.tensor(state["adam_v"], dtype=torch.float64)
        self.adam_t = int(state["adam_t"])
        self.last_log_loss = torch.tensor(
            [float("nan") if x is None else x for x in state["last_log_loss"]], dtype=torch.float64
        )
