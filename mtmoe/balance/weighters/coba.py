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
batch per step, and DF capped at 1. Deliberate differences:
- a task absent from a step's validation batch is dropped from its slope fit together with its step
  index (MFTCoder drops the loss but keeps the first indices), and the history starts with the first step;
- a task with fewer than 2 validation points in the window has no slope: it takes no part in RCS, ACS
  or the worst-task loss, and keeps weight 1 (the warm-up's), while the tasks with a history share the
  rest of the K weight. (A slope of 0 would read as "stalled" and draw most of the weight.)
- ACS compares a task's slope with its last `history` slopes. MFTCoder indexes the slope list by step
  number, which leaves a window of history − warm-up + 1 slopes and breaks when the warm-up is longer
  than the history; here any warm-up and history work;
- slopes are the closed-form least-squares fit, summed exactly (`math.fsum`), so a resumed run computes
  bit for bit the weights of an uninterrupted one (`torch.linalg.lstsq` is not deterministic on CPU).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F

from mtmoe.balance.weighters.base import TaskWeighter, register_weighter
from mtmoe.config import check


def window_slope(x: list[float], y: list[float]) -> float:
    """Least-squares slope of y over x, ignoring NaN entries of y (0 with fewer than 2 points).

    The sums are exact (`math.fsum`), so equal inputs always give the same slope, on any machine.
    """
    points = [(float(a), float(b)) for a, b in zip(x, y, strict=True) if not math.isnan(b)]
    n = len(points)
    if n < 2:
        return 0.0
    mean_x = math.fsum(a for a, _ in points) / n
    mean_y = math.fsum(b for _, b in points) / n
    sxx = math.fsum((a - mean_x) ** 2 for a, _ in points)
    sxy = math.fsum((a - mean_x) * (b - mean_y) for a, b in points)
    return sxy / sxx if sxx > 0 else 0.0


def _finite_count(values: list[float]) -> int:
    return sum(1 for v in values if not math.isnan(v))


@dataclasses.dataclass(kw_only=True)
class CoBaOptions:
    """Options of `coba`.

    Attributes:
        warmup: Steps with uniform weights before CoBa starts.
        history: Validation losses the slopes are fitted over.
        tau: Temperature of the divergence factor.
    """

    warmup: int = 100
    history: int = 200
    tau: float = 5.0

    def __post_init__(self):
        check(self.warmup >= 1, "balance.options.warmup", ">= 1")
        check(self.history >= 2, "balance.options.history", ">= 2")


@register_weighter("coba", CoBaOptions)
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
        steps = list(range(start, t))
        window = [[row[k] for row in self.losses[start:]] for k in range(K)]
        has_history = [_finite_count(window[k]) >= 2 for k in range(K)]
        nan = float("nan")
        slopes = [window_slope(steps, window[k]) if has_history[k] else nan for k in range(K)]
        worst = []
        for i in range(len(steps)):
            seen = [window[k][i] for k in range(K) if has_history[k] and not math.isnan(window[k][i])]
            worst.append(max(seen) if seen else nan)
        self.task_slopes.append(slopes)
        self.total_slopes.append(window_slope(steps, worst))
        known = [k for k in range(K) if has_history[k]]
        if not known:
            return torch.ones(K, dtype=torch.float64)

        n_known = len(known)
        slope_N = torch.tensor([slopes[k] for k in known], dtype=torch.float64)
        rcs = F.softmax(n_known * slope_N / slope_N.abs().sum().clamp_min(1e-12), dim=0)
        recent = self.task_slopes[-self.history :]
        acs_logits = []
        for k in known:  # the current slope against the task's own slope history (absent entries skipped)
            own = [row[k] for row in recent if not math.isnan(row[k])]
            acs_logits.append(-len(own) * own[-1] / max(math.fsum(abs(v) for v in own), 1e-12))
        acs = F.softmax(torch.tensor(acs_logits, dtype=torch.float64), dim=0)
        total = torch.tensor(self.total_slopes, dtype=torch.float64)  # the whole history, as MFTCoder
        m = len(total)
        df = float(F.softmax(-m * total / total.abs().sum().clamp_min(1e-12) * self.tau, dim=0)[-1] * m)
        df = min(df, 1.0)
        weights = F.softmax(n_known * (df * rcs + (1 - df) * acs), dim=0)
        floor = 1.0 / (10 * n_known)
        if (weights < floor).any():
            weights = weights * (1 - floor * n_known) + floor
        self.last_scores = {"rcs": rcs, "acs": acs, "df": df, "tasks": known}
        out = torch.ones(K, dtype=torch.float64)  # tasks without a history keep the warm-up's weight
        out[known] = n_known * weights
        return out

    def state_dict(self) -> dict[str, Any]:
        """Normalisation, loss history, slope histories and the current weights."""
        return {
            "initial": [None if x != x else x for x in self.initial.tolist()],
            "losses": [[None if x != x else x for x in row] for row in self.losses],
            "task_slopes": [[None if x != x else x for x in row] for row in self.task_slopes],
            "total_slopes": self.total_slopes,
            "weights": self._weights.tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores `state_dict`."""
        nan = float("nan")
        self.initial = torch.tensor([nan if x is None else x for x in state["initial"]], dtype=torch.float64)
        self.losses = [[nan if x is None else x for x in row] for row in state["losses"]]
        self.task_slopes = [[nan if x is None else x for x in row] for row in state["task_slopes"]]
        self.total_slopes = list(state["total_slopes"])
        self._weights = torch.tensor(state["weights"], dtype=torch.float64)
