"""Token-choice top-k router with the load-balance auxiliary loss.

Shape legend: T tokens, D hidden size, E experts, K experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class RouterOutput:
    """What a router decides for a batch of tokens.

    Attributes:
        weights_TK: Gate weight of each chosen expert.
        ids_TK: Chosen expert ids.
        aux_loss: Switch/Mixtral load-balance loss, E * sum_e f_e * P_e, over the valid tokens
            (equals 1 when routing is perfectly balanced).
    """

    weights_TK: torch.Tensor
    ids_TK: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor | None = None


class TopKRouter(nn.Module):
    """Softmax top-k router (token choice, dropless).

    Args:
        dim: Hidden size D.
        num_experts: Number of experts E.
        top_k: Experts per token K.
        normalize: Renormalise the K chosen weights to sum to one.
        init_std: Standard deviation of the initial router weights.
    """

    def __init__(
        self, dim: int, num_experts: int, top_k: int, normalize: bool = True, init_std: float = 0.02
    ):
        super().__init__()
        self.num_experts, self.top_k, self.normalize = num_experts, top_k, normalize
        self.weight_ED = nn.Parameter(torch.randn(num_experts, dim) * init_std)

    def forward(
        self, x_TD: torch.Tensor, valid_T: torch.Tensor | None = None, task_T: torch.Tensor | None = None
    ) -> RouterOutput:
        """Routes tokens.

        Args:
            x_TD: Token hidden states.
            valid_T: Bool mask of real (non-padding) tokens; only they count in the auxiliary loss.
            task_T: Task id of every token (used by task-aware routing).
        """
        # Routing runs in fp32: bf16 logits flip near-tied top-k choices between equivalent runs.
        logits_TE = x_TD.float() @ self.weight_ED.float().t()
        probs_TE = logits_TE.softmax(dim=-1)
        top_TK, ids_TK = probs_TE.topk(self.top_k, dim=-1)
        if self.normalize:
            top_TK = top_TK / top_TK.sum(dim=-1, keepdim=True)
        aux = load_balance_loss(probs_TE, ids_TK, valid_T)
        return RouterOutput(weights_TK=top_TK.to(x_TD.dtype), ids_TK=ids_TK, aux_loss=aux)


def load_balance_loss(
    probs_TE: torch.Tensor, ids_TK: torch.Tensor, valid_T: torch.Tensor | None
) -> torch.Tensor:
    """E * sum_e f_e * P_e, with f_e the share of assignments and P_e the mean probability of expert e.

    Args:
        probs_TE: Router probabilities.
        ids_TK: Chosen experts.
        valid_T: Optional bool mask of tokens to count.
    """
    E = probs_TE.shape[-1]
    w_T = probs_TE.new_ones(probs_TE.shape[0]) if valid_T is None else valid_T.to(probs_TE.dtype)
    n = w_T.sum().clamp_min(1.0)
    assign_TE = torch.zeros_like(probs_TE).scatter_(1, ids_TK, 1.0)
    f_E = (assign_TE * w_T[:, None]).sum(0) / (n * ids_TK.shape[1])
    p_E = (probs_TE * w_T[:, None]).sum(0) / n
    return E * (f_E * p_E).sum()
