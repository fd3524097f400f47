"""Cross-entropy through a frozen LM head, fused and chunked: no N×V logits or gradients are kept.

The head is frozen in every mtmoe run, so the only gradient the loss sends back is to the hidden states.
For token n, d ce_n / d h_n = (softmax(W h_n) - onehot(y_n)) W does not depend on what comes after the
loss, so the forward computes it chunk by chunk, right after the chunk's logits, and keeps only the N×D
result. The backward scales it by the incoming gradient of each token's loss. Peak memory for the head
drops from a few N×V tensors to one chunk×V block, at no extra FLOPs (the unfused backward does the
same (P - Y) W product).

A head stored narrower than the hidden states (`model.frozen_dtype`) is cast slice by slice of the
vocabulary, so no full-precision copy of the V×D head is made.

Shape legend: N target tokens, D hidden size, V vocabulary, C rows of one chunk, U vocabulary rows of
one cast slice.
"""

from __future__ import annotations

import torch

from mtmoe.model.frozen_store import CastWorkspace

CHUNK_BYTES = 64 << 20  # one chunk's fp32 logits: 341 rows at V = 49152
CAST_ROWS = 8192  # vocabulary rows of a narrow head cast at a time: 18 MiB in fp32 at D = 576


def chunk_rows(vocab_size: int) -> int:
    """Rows per chunk so that one chunk's fp32 logits take about `CHUNK_BYTES`."""
    return max(16, CHUNK_BYTES // (4 * vocab_size))


def _head_logits(hidden_CD: torch.Tensor, weight_VD: torch.Tensor, workspace: CastWorkspace) -> torch.Tensor:
    """`hidden_CD @ weight_VD.T` in the hidden states' dtype; a narrower head is cast a slice at a time."""
    if weight_VD.dtype == hidden_CD.dtype:
        return hidden_CD @ weight_VD.t()
    logits_CV = hidden_CD.new_empty(hidden_CD.shape[0], weight_VD.shape[0])
    for v0 in range(0, weight_VD.shape[0], CAST_ROWS):
        w_UD = workspace.widened(weight_VD[v0 : v0 + CAST_ROWS], hidden_CD.dtype)
        torch.matmul(hidden_CD, w_UD.t(), out=logits_CV[:, v0 : v0 + CAST_ROWS])
    return logits_CV


def _head_input_grad(
    prob_CV: torch.Tensor, weight_VD: torch.Tensor, dtype: torch.dtype, workspace: CastWorkspace
) -> torch.Tensor:
    """`prob_CV @ weight_VD` in `dtype` (the hidden states'); a narrower head is cast a slice at a time."""
    if weight_VD.dtype == dtype:
        return prob_CV.to(dtype) @ weight_VD
    grad_CD = prob_CV.new_zeros(prob_CV.shape[0], weight_VD.shape[1], dtype=dtype)
    for v0 in range(0, weight_VD.shape[0], CAST_ROWS):
        w_UD = workspace.widened(weight_VD[v0 : v0 + CAST_ROWS], dtype)
        grad_CD.addmm_(prob_CV[:, v0 : v0 + CAST_ROWS].to(dtype), w_UD)
    return grad_CD


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_ND, weight_VD, targets_N, rows, need_grad, workspace):
        ce_N = hidden_ND.new_empty(hidden_ND.shape[0], dtype=torch.float32)
        grad_ND = torch.empty_like(hidden_ND) if need_grad else None
        for start in range(0, hidden_ND.shape[0], rows):
            end = min(start + rows, hidden_ND.shape[0])
            logits_CV = _head_logits(hidden_ND[start:end], weight_VD, workspace).float()
            lse_C = torch.logsumexp(logits_CV, dim=1)
            target_C = targets_N[start:end]
            ce_N[start:end] = lse_C - logits_CV.gather(1, target_C[:, None]).squeeze(1)
            if need_grad:
                prob_CV = logits_CV.sub_(lse_C[:, None]).exp_()  # in place: the logits are not needed again
                prob_CV[torch.arange(end - start, device=prob_CV.device), target_C] -= 1.0
                grad_ND[start:end] = _head_input_grad(prob_CV, weight_VD, grad_ND.dtype, workspace)
        ctx.save_for_backward(grad_ND)
        return ce_N

    @staticmethod
    def backward(ctx, grad_ce_N):
        (grad_ND,) = ctx.saved_tensors
        return grad_ND * grad_ce_N[:, None].to(grad_ND.dtype), None, None, None, None, None


def fused_cross_entropy(
    hidden_ND: torch.Tensor,
    weight_VD: torch.Tensor,
    targets_N: torch.Tensor,
    rows: int | None = None,
    workspace: CastWorkspace | None = None,
) -> torch.Tensor:
    """Per-token cross-entropy of `hidden_ND @ weight_VD.T` against `targets_N`, fused and chunked.

    Equals `F.cross_entropy((hidden_ND @ weight_VD.T).float(), targets_N, reduction="none")`, with the
    gradient to `hidden_ND` only: the head weight must be frozen.

    Args:
        hidden_ND: Hidden states of the positions that predict a target.
        weight_VD: The frozen LM head (output embedding) weight.
        targets_N: Target token ids.
        rows: Rows per chunk (default: `chunk_rows(V)`).
        workspace: Where a narrower head is cast slice by slice: the head's own (a stored head's
            `workspace`), or a new one for this call.

    Returns:
        ce_N, fp32.

    Raises:
        ValueError: If the head weight requires grad.
    """
    if weight_VD.requires_grad and torch.is_grad_enabled():
        raise ValueError("fused_cross_entropy needs a frozen LM head (its weight gets no gradient)")
    need_grad = torch.is_grad_enabled() and hidden_ND.requires_grad
    rows = rows or chunk_rows(weight_VD.shape[0])
    workspace = workspace or CastWorkspace()
    return _FusedLinearCrossEntropy.apply(hidden_ND, weight_VD, targets_N, rows, need_grad, workspace)
