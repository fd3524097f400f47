"""Quality Retaining (EMTAL), adapted to language models: a converged task is held where it was best.

EMTAL retains what the model knew about a task once that task has converged. Here:

- **Teacher.** The run keeps an EMA θ̄ of the trainable tensors (LoRA factors, routers), updated after
  every applied optimizer step with decay `balance.qr_ema`. Each task's validation loss (from the
  per-task validation stream, all-reduced over ranks) is smoothed with decay `balance.qr_smooth`; when
  the smoothed loss reaches a new minimum after `balance.qr_warmup` steps, a copy of θ̄ becomes that
  task's teacher. The frozen base is shared, so a teacher is only the trainable tensors.
- **Distillation term.** For the samples of every task k that has a teacher, the teacher's next-token
  distribution at the target positions is computed (a forward without gradient, the teacher's tensors
  swapped in), and the loss gains

      L_QR = qr_coef * sum_k (1 / L_CE,k) * mean over task k's target tokens of KL(p_teacher || p_student),

  with L_CE,k the task's training loss of the previous step. A converged task (low L_CE) is held in
  place firmly; a task that is still learning is hardly held at all. The token mean is over the whole
  global batch (all ranks, all micro-batches), like the data-balanced loss.
- **Cost.** Memory: (1 + tasks with a teacher) copies of the trainable tensors, in fp32, of this rank's
  share of the experts; for the demo (6.2M trainable parameters, 3 tasks) at most 4 × 25 MB = 100 MB.
  Compute: one extra forward without gradient per micro-batch for each task that has a teacher, on
  that task's rows only (every rank runs each, with a one-row filler when it has no such row, because
  an expert-parallel forward is a collective).

The cached-logits alternative (top-k teacher logits of each task's samples) costs memory per sample and
per token; the EMA teacher's memory is fixed and small for LoRA experts, so that is the one shipped.

Shape legend: N target tokens, V vocabulary, X tasks.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def distillation_sums(
    student_logits_NV: torch.Tensor, teacher_logits_NV: torch.Tensor, task_N: torch.Tensor, num_tasks: int
) -> torch.Tensor:
    """Per-task sums over target tokens of KL(p_teacher || p_student), differentiable in the student, (X,)."""
    log_p_student_NV = F.log_softmax(student_logits_NV.float(), dim=-1)
    log_p_teacher_NV = F.log_softmax(teacher_logits_NV.float(), dim=-1)
    kl_N = (log_p_teacher_NV.exp() * (log_p_teacher_NV - log_p_student_NV)).sum(-1)
    return torch.zeros(num_tasks, dtype=kl_N.dtype, device=kl_N.device).index_add(0, task_N, kl_N)


def retain_loss(
    kl_sums_X: torch.Tensor, counts_X: torch.Tensor, ce_X: torch.Tensor, coef: float, grad_scale: float
) -> torch.Tensor:
    """This micro-batch's share of qr_coef * sum_k KL_k / (N_k * L_CE,k), over tasks with a teacher.

    Args:
        kl_sums_X: This micro-batch's per-task KL sums (0 for tasks without a teacher).
        counts_X: Global target tokens per task of the step.
        ce_X: Each task's last training loss (its retention strength is 1 / L_CE).
        coef: qr_coef.
        grad_scale: The factor that undoes DeepSpeed's gradient averaging (world x accumulation).
    """
    strength_X = (coef / ce_X.clamp_min(1e-3)).to(kl_sums_X.dtype).to(kl_sums_X.device)
    per_token_X = kl_sums_X / counts_X.clamp_min(1).to(kl_sums_X.dtype).to(kl_sums_X.device)
    return grad_scale * (strength_X * per_token_X).sum()


def held(p: torch.Tensor) -> torch.Tensor:
    """What this rank holds of a trainable tensor: the tensor, or under ZeRO-3 its flat partition.

    Under ZeRO-3 a parameter's `data` is empty between forwards, and the forwards gather it from the
    partitions; so the EMA and the teachers are kept, and a teacher put in place, partition by partition.
    """
    return p.ds_tensor if hasattr(p, "ds_id") else p


class QualityRetainer:
    """The EMA, the per-task teachers and their bookkeeping.

    Args:
        model: The trained module (its trainable tensors are tracked by name).
        num_tasks: X, tasks in the manifest.
        coef: qr_coef.
        ema: Decay of the weight EMA.
        smooth: Decay of the smoothed validation losses.
        warmup: No teacher is taken before this step.
    """

    def __init__(self, model: nn.Module, num_tasks: int, coef: float, ema: float, smooth: float, warmup: int):
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.num_tasks, self.coef, self.decay, self.smooth, self.warmup = num_tasks, coef, ema, smooth, warmup
        self.ema = {n: held(p).detach().float().clone() for n, p in self.params.items()}
        self.teachers: dict[int, dict[str, torch.Tensor]] = {}
        self.smoothed_X = torch.full((num_tasks,), float("nan"), dtype=torch.float64)
        self.best_X = torch.full((num_tasks,), float("inf"), dtype=torch.float64)
        self.ce_X = torch.ones(num_tasks, dtype=torch.float64)

    @torch.no_grad()
    def update_ema(self) -> None:
        """θ̄ ← ema·θ̄ + (1 − ema)·θ, after an applied optimizer step."""
        for n, p in self.params.items():
            self.ema[n].mul_(self.decay).add_(held(p).detach().float(), alpha=1 - self.decay)

    def observe_train(self, losses_X: torch.Tensor, present_X: torch.Tensor) -> None:
        """Keeps each present task's training loss (its retention strength is the inverse)."""
        self.ce_X = torch.where(present_X, losses_X.double(), self.ce_X)

    def observe_validation(self, losses_X: torch.Tensor, present_X: torch.Tensor, step: int) -> list[int]:
        """Smooths the validation losses; snapshots θ̄ as the teacher of each task at a new best.

        Returns:
            The tasks that got a new teacher.
        """
        fresh = torch.isnan(self.smoothed_X)
        blended = self.smooth * self.smoothed_X + (1 - self.smooth) * losses_X.double()
        self.smoothed_X = torch.where(
            present_X, torch.where(fresh, losses_X.double(), blended), self.smoothed_X
        )
        if step < self.warmup:
            return []
        improved = [k for k in range(self.num_tasks) if present_X[k] and self.smoothed_X[k] < self.best_X[k]]
        for k in improved:
            self.best_X[k] = self.smoothed_X[k]
            self.teachers[k] = {n: t.clone() for n, t in self.ema.items()}
        return improved

    @contextmanager
    def teacher_weights(self, task: int):
        """Temporarily puts task `task`'s teacher into the model (restored exactly afterwards)."""
        saved = {n: held(p).detach().clone() for n, p in self.params.items()}
        try:
            with torch.no_grad():
                for n, p in self.params.items():
                    held(p).copy_(self.teachers[task][n].to(p.dtype))
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    held(p).copy_(saved[n])

    def tensors(self) -> dict[str, torch.Tensor]:
        """The EMA and the teachers by name (`ema/<name>`, `teacher/<k>/<name>`), this rank's layout.

        This rank's layout: its experts, and under ZeRO-3 its flat partition of each tensor.
        """
        out = {f"ema/{n}": t for n, t in self.ema.items()}
        for k, teacher in self.teachers.items():
            out.update({f"teacher/{k}/{n}": t for n, t in teacher.items()})
        return out

    def state_dict(self) -> dict[str, Any]:
        """The JSON part of the state (the tensors are in `tensors`)."""
        nan_to_none = [None if x != x else x for x in self.smoothed_X.tolist()]
        best = [None if x == float("inf") else x for x in self.best_X.tolist()]
        return {
            "smoothed": nan_to_none,
            "best": best,
            "ce": self.ce_X.tolist(),
            "teachers": sorted(self.teachers),
        }

    def load_state(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Restores `state_dict` plus `tensors` (already in this rank's layout)."""
        self.smoothed_X = torch.tensor(
            [float("nan") if x is None else x for x in state["smoothed"]], dtype=torch.float64
        )
        self.best_X = torch.tensor(
            [float("inf") if x is None else x for x in state["best"]], dtype=torch.float64
        )
        self.ce_X = torch.tensor(state["ce"], dtype=torch.float64)
        self.ema = {n: tensors[f"ema/{n}"].clone() for n in self.params}
        self.teachers = {
            k: {n: tensors[f"teacher/{k}/{n}"].clone() for n in self.params} for k in state["teachers"]
        }
