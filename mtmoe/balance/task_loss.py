"""The data-balanced multitask loss: every task's loss is its token mean, and tasks weigh equally.

MFTCoder averages per rank and per micro-batch, which skews the mean whenever ranks or micro-batches hold
different task mixes. Here the per-task token counts of the whole global batch (all ranks, all
micro-batches of one optimizer step) are all-reduced first, so each micro-batch's loss is its exact
share of  (1/K) * sum_k S_k / N_k,  with S_k the global token-loss sum of task k and N_k its global
token count (K = tasks present in the global batch). Task weights w_k make it Σ_k w_k S_k/N_k / Σ_k w_k
over the present tasks (see `balanced_loss`).

Shape legend: B batch, S sequence, V vocabulary, X tasks.
"""

from __future__ import annotations

import torch

from mtmoe.model.token_loss import target_mask


def task_token_counts(loss_mask_BS: torch.Tensor, task_ids: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """Loss-carrying tokens per task in a micro-batch, as float64 (X,).

    Args:
        loss_mask_BS: 1 at prediction targets.
        task_ids: The task of every row, (B,), or of every token, (B, S) (packed rows).
        num_tasks: X.
    """
    is_target_BS = target_mask(loss_mask_BS).cpu()
    if task_ids.dim() == 1:
        per_row_B = is_target_BS.sum(1).double()
        return torch.zeros(num_tasks, dtype=torch.float64).index_add(0, task_ids.cpu(), per_row_B)
    return torch.bincount(task_ids.cpu()[is_target_BS], minlength=num_tasks).double()


def task_loss_sums(loss_BS: torch.Tensor, task_ids: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """Per-task sums of token losses, (X,), differentiable.

    Args:
        loss_BS: Token losses (0 off the targets).
        task_ids: The task of every row, (B,), or of every token, (B, S) (packed rows).
        num_tasks: X.
    """
    if task_ids.dim() == 1:
        return loss_BS.new_zeros(num_tasks).index_add(0, task_ids, loss_BS.sum(1))
    return loss_BS.new_zeros(num_tasks).index_add(0, task_ids.reshape(-1), loss_BS.reshape(-1))


def balanced_loss(
    sums_X: torch.Tensor,
    global_counts_X: torch.Tensor,
    grad_scale: float,
    weights_X: torch.Tensor | None = None,
    normalize_by: str = "weight_sum",
) -> torch.Tensor:
    """This micro-batch's share of the weighted mean of the present tasks' token means.

    With P the tasks present in the global batch and L_k = S_k / N_k, the loss is
    - `weight_sum` (every weighter but `uncertainty`; MFTCoder's form):  Σ_P w_k L_k / Σ_P w_k, so the
      loss's scale does not depend on which tasks a batch happens to hold, nor on the weights' scale;
    - `task_count` (`uncertainty`, whose weights are precisions that carry an absolute scale):
      Σ_P w_k L_k / |P|.
    With all weights 1 both are the data-balanced loss (1/|P|) Σ_P L_k.

    Args:
        sums_X: Per-task token-loss sums of this micro-batch on this rank.
        global_counts_X: Per-task token counts over the global batch (all ranks, all micro-batches).
        grad_scale: world_size * grad_accum: DeepSpeed averages gradients over data-parallel ranks and
            divides by the accumulation steps, so this factor makes the summed gradient exactly that of
            the global balanced loss.
        weights_X: Task weights, non-negative (None = all 1, the data-balanced loss).
        normalize_by: `weight_sum` or `task_count`, as above.

    Returns:
        A scalar to backpropagate (zero, with a graph, when no present task has weight).
    """
    if normalize_by not in NORMALIZATIONS:
        raise ValueError(f"normalize_by {normalize_by!r}: expected one of {NORMALIZATIONS}")
    present_X = (global_counts_X > 0).to(sums_X.device)
    counts_X = global_counts_X.to(sums_X.device, sums_X.dtype).clamp_min(1.0)
    if weights_X is None:
        weights_X = torch.ones_like(sums_X)
    w_X = torch.where(present_X, weights_X.to(sums_X.device, sums_X.dtype), torch.zeros_like(sums_X))
    denom = float(w_X.sum()) if normalize_by == "weight_sum" else float(present_X.sum())
    if denom <= 0:
        return sums_X.sum() * 0.0
    return (w_X * sums_X / counts_X).sum() * (grad_scale / denom)


NORMALIZATIONS = ("weight_sum", "task_count")
