"""Dynamic Weight Average (Liu et al., 2019): tasks whose loss falls slowly get more weight.

w_k = K * softmax_k(r_k / T),  r_k = L_k(t-1) / L_k(t-2).
Per-step losses of small batches are noisy, so L_k here is an exponential moving average of the
task's loss (`ema`); with ema=0 it is the raw per-step loss of the paper's per-epoch form.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from mtmoe.balance.weighters.base import TaskWeighter, register_weighter
from mtmoe.config import check


@dataclasses.dataclass(kw_only=True)
class DWAOptions:
    """Options of `dwa`.

    Attributes:
        temperature: T of the softmax over loss ratios.
        ema: Smoothing of the per-task losses compared, in [0, 1).
    """

    temperature: float = 2.0
    ema: float = 0.9

    def __post_init__(self):
        check(self.temperature > 0, "balance.options.temperature", "> 0")
        check(0 <= self.ema < 1, "balance.options.ema", "in [0, 1)")


@register_weighter("dwa", DWAOptions)
class DWA(TaskWeighter):
    """Dynamic Weight Average.

    Args:
        num_tasks: K.
        temperature: T (the paper uses 2).
        ema: Smoothing of the per-task loss, in [0, 1).
    """

    def __init__(self, num_tasks: int, temperature: float = 2.0, ema: float = 0.9, **_: Any):
        super().__init__(num_tasks)
        self.temperature, self.ema = temperature, ema
        self.prev = torch.full((num_tasks,), float("nan"), dtype=torch.float64)  # L(t-2)
        self.last = torch.full((num_tasks,), float("nan"), dtype=torch.float64)  # L(t-1)

    def weights(self, counts_X: torch.Tensor | None = None) -> torch.Tensor:
        """K * softmax(r / T); tasks without two observations yet have r = 1."""
        ratio = self.last / self.prev
        ratio = torch.where(torch.isfinite(ratio), ratio, torch.ones_like(ratio))
        return self.num_tasks * torch.softmax(ratio / self.temperature, dim=0)

    def observe(self, losses_X: torch.Tensor, present_X: torch.Tensor) -> None:
        """Shifts the smoothed losses of the tasks present in this step."""
        losses = losses_X.double()
        smoothed = torch.where(torch.isnan(self.last), losses, self.ema * self.last + (1 - self.ema) * losses)
        self.prev = torch.where(present_X, self.last, self.prev)
        self.last = torch.where(present_X, smoothed, self.last)

    def state_dict(self) -> dict[str, Any]:
        """The two smoothed loss vectors."""
        return {"prev": self.prev.tolist(), "last": self.last.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the smoothed losses."""
        self.prev = torch.tensor(state["prev"], dtype=torch.float64)
        self.last = torch.tensor(state["last"], dtype=torch.float64)
