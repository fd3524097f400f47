"""Per-token next-token losses at the positions that carry loss (the assistant tokens).

Shape legend: B batch, S sequence, D hidden, V vocabulary, N target tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mtmoe.model.fused_ce import fused_cross_entropy


def token_losses(
    logits_BSV: torch.Tensor, input_ids_BS: torch.Tensor, loss_mask_BS: torch.Tensor
) -> torch.Tensor:
    """Next-token cross-entropy at every position whose target token carries loss (0 elsewhere).

    Args:
        logits_BSV: Model outputs.
        input_ids_BS: Input tokens.
        loss_mask_BS: 1 where the token is a target (an assistant token).

    Returns:
        loss_BS: Per-target-token loss aligned with the target tokens (position 0 is always 0).
    """
    targets_BS = input_ids_BS[:, 1:]
    ce = F.cross_entropy(logits_BSV[:, :-1].float().transpose(1, 2), targets_BS, reduction="none")
    loss_BS = F.pad(ce, (1, 0)) * loss_mask_BS.float()
    loss_BS[:, 0] = 0.0
    return loss_BS


def target_token_losses(
    hidden_BSD: torch.Tensor, lm_head: torch.nn.Module, input_ids_BS: torch.Tensor, loss_mask_BS: torch.Tensor
) -> torch.Tensor:
    """Same result as `token_losses`, but the LM head runs only on the positions that predict a target.

    Only a fraction of tokens carry loss (assistant tokens), and the vocabulary projection plus its
    softmax is a large share of a small model's compute, so this skips most of it.

    A frozen, bias-free head (every mtmoe run's) takes the fused, chunked cross-entropy
    (`mtmoe.model.fused_ce`), which never holds all the targets' logits at once.

    Returns:
        loss_BS: Per-target-token loss aligned with the target tokens (0 elsewhere).
    """
    weight = getattr(lm_head, "weight", None)
    fusable = isinstance(lm_head, torch.nn.Linear) and lm_head.bias is None and not weight.requires_grad
    if not fusable:
        return target_losses_and_logits(hidden_BSD, lm_head, input_ids_BS, loss_mask_BS)[0]
    is_target_BS = target_mask(loss_mask_BS)
    target_bi, target_si = is_target_BS.nonzero(as_tuple=True)
    ce_N = fused_cross_entropy(
        hidden_BSD[target_bi, target_si - 1],
        weight,
        input_ids_BS[target_bi, target_si],
        workspace=getattr(lm_head, "workspace", None),  # a stored head casts into its model's buffers
    )
    return torch.zeros(is_target_BS.shape, dtype=ce_N.dtype, device=ce_N.device).index_put(
        (target_bi, target_si), ce_N
    )


def target_losses_and_logits(
    hidden_BSD: torch.Tensor, lm_head: torch.nn.Module, input_ids_BS: torch.Tensor, loss_mask_BS: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`target_token_losses`, plus the logits that predict each target token.

    Returns:
        (loss_BS, logits_NV): N target tokens in row-major order of `target_mask(loss_mask_BS)`.
    """
    is_target_BS = target_mask(loss_mask_BS)
    target_bi, target_si = is_target_BS.nonzero(as_tuple=True)
    logits_NV = lm_head(hidden_BSD[target_bi, target_si - 1]).float()
    ce_N = F.cross_entropy(logits_NV, input_ids_BS[target_bi, target_si], reduction="none")
    loss_BS = torch.zeros(is_target_BS.shape, dtype=ce_N.dtype, device=ce_N.device).index_put(
        (target_bi, target_si), ce_N
    )
    return loss_BS, logits_NV


def target_mask(loss_mask_BS: torch.Tensor) -> torch.Tensor:
    """Loss-carrying positions that have a preceding token (the first position predicts nothing)."""
    mask = loss_mask_BS.clone().bool()
    mask[:, 0] = False
    return mask
