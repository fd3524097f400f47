"""CoBa, the Convergence Balancer (Gong et al., 2024), after MFTCoder's released implementation.

CoBa watches a per-task **validation** loss, normalised by its value before training, and fits the
slope of its recent history (least squares over the last `history` steps):
- RCS, relative convergence score: softmax_k(K · s_k / Σ_j |s_j|) on the current slopes. Tasks whose
  validation loss falls slowly (or rises) score high.
- ACS, absolute convergence score: each task's current slope against its own slope history,
  softmax_k(−n · s_k(t) / Σ_τ |s_k(τ)|). Tasks converging faster than they used to score high.
- DF, divergence factor: n · softmax_τ(−n · S(τ) / Σ|S| · τ_DF)[last] on the slope S of the
  worst task's loss. It shifts weight from ACS to RCS once some task starts to diverge.
Weights are softmax_k(K · (DF · RCS + (1 − DF) · ACS)), floored at 1/(10K), and rescaled here to sum to
K (so the loss stays on the data-balanced scale). During the warm-up, weights are 1.

Defaults follow MFTCoder: warm-up 100 steps, history 200, τ = 5, update every step, one validation
batch per step. Two deliberate differences: a task absent from a step's validation batch is dropped
from its slope fit together with its step index (MFTCoder drops the loss but keeps the first indices),
and the history starts with the first step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mtmoe.balance.weighters.base import TaskWeighter


def window_slope(x: torch.Tensor, y: torch.Tensor) -> float:
    """Least-squares slope of y over x, ignoring NaN entries of y (0 with fewer than 2 points)."""
    keep = ~torch.isnan(y)
    x, y = x[keep].double(), y[keep].double()
    if len(y) < 2:
        return 0.0
    design = torch.stack([x, torch.ones_like(x)], dim=1)
    return float(torch.linalg.lstsq(design, y[:, None]).solution[0, 0])


class CoBa(TaskWeighter):
    """Convergence Balancer weights from a per-task validation stream.

    Args:
        num_tasks: K.
        warmup: Steps with uniform weights before CoBa starts.
        history: Validation losses the slopes are fitted over.
        tau: Temperature of the divergence factor.
    """

    needs_validation = True

    def __init__(self, num_tasks: int, warmup: int = 100, history: int = 200, tau: float = 5.0, **_: Any):
        super().__init__(num_tasks)
        self.warmup, self.history, self.tau = warmup, history, tau
        self.min_weight = 1.0 / (10 * num_tasks)
        self.initial = torch.full((num_tasks,), float("nan"), dtype=torch.float64)
        self.losses: list[list[float]] = []  # normalised validation loss after each step (NaN = absent)
        self.task_slopes: list[list[float]] = []  # per-task slopes, one entry per weight computation
        self.total_slopes: list[float] = []
        self._weights = torch.ones(num_tasks, dtype=torch.float64)

    def weights(self, counts_X: torch.Tensor | None = None) -> torch.Tensor:
        """The weights computed after the last observed step (1 during warm-up)."""
        return self._weights.clone()

    def observe_validation(self, losses_X: torch.Tensor, present_X: torch.Tensor) -> None:
        """Takes the global per-task validation losses of one batch.

        The first call (before any training step) sets the normalisation; each later call appends one
        step to the history and, after the warm-up, recomputes the weights.
        """
        losses = torch.where(present_X, losses_X.double(), torch.full_like(losses_X.double(), float("nan")))
        if torch.isnan(self.initial).all() and not self.losses:
            self.initial = losses
            return
        self.initial = torch.where(torch.isnan(self.initial), losses, self.initial)
        self.losses.append((losses / self.initial).tolist())
        if len(self.losses) >= self.warmup:
            self._weights = self._compute()

    def _compute(self) -> torch.Tensor:
        K, t = self.num_tasks, len(self.losses)
        start = max(0, t - self.history)
        steps = torch.arange(start, t, dtype=torch.float64)
        window = torch.tensor(self.losses[start:], dtype=torch.float64).t()  # (K, L)
        slopes = torch.tensor([window_slope(steps, window[k]) for k in range(K)], dtype=torch.float64)
        worst = torch.nan_to_num(window, nan=float("-inf")).max(dim=0).values
        worst = torch.where(torch.isinf(worst), torch.full_like(worst, float("nan")), worst)
        self.task_slopes.append(slopes.tolist())
        self.total_slopes.append(window_slope(steps, worst))

        rcs = F.softmax(K * slopes / slopes.abs().sum().clamp_min(1e-12), dim=0)
        history = torch.tensor(self.task_slopes[start:], dtype=torch.float64).t()  # (K, n)
        n = history.shape[1]
        acs = F.softmax(-n * history[:, -1] / history.abs().sum(dim=1).clamp_min(1e-12), dim=0)
        total = torch.tensor(self.total_slopes, dtype=torch.float64)
        m = len(total)
        df = float(F.softmax(-m * total / total.abs().sum().clamp_min(1e-12) * self.tau, dim=0)[-1] * m)
        weights = F.softmax(K * (df * rcs + (1 - df) * acs), dim=0)
        if (weights < self.min_weight).any():
            weights = weights * (1 - self.min_weight * K) + self.min_weight
        self.last_scores = {"rcs": rcs, "acs": acs, "df": df}
        return K * weights

    def state_dict(self) -> dict[str, Any]:
        """Normalisation, loss history, slope histories and the current weights."""
        return {
            "initial": [None if x != x else x for x in self.initial.tolist()],
            "losses": [[None if x != x else x for x in row] for row in self.losses],
            "task_slopes": self.task_slopes,
            "total_slopes": self.total_slopes,
            "weights": self._weights.tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores `state_dict`."""
        nan = float("nan")
        self.initial = torch.tensor([nan if x is None else x for x in state["initial"]], dtype=torch.float64)
        self.losses = [[nan if x is None else x for x in row] for row in state["losses"]]
        self.task_slopes = [list(r) for r in state["task_slopes"]]
        self.total_slopes = list(state["total_slopes"])
        self._weights = torch.tensor(state["weights"], dtype=torch.float64)
