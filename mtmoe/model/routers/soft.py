"""EMTAL's soft router over a MoEfied FFN's slices (`moe.router: soft`).

Shape legend: T tokens, D hidden size, E slices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as Fn
from torch import nn

from mtmoe.model.routers.base import Router, RouterOutput, RouterShape, register_router


@dataclass(kw_only=True)
class SoftOptions:
    """Settings of the soft router (`moe.router_options` with `moe.router: soft`).

    Attributes:
        tau: Temperature τ of ω = E·softmax(LN(x)·W/τ); a larger τ keeps ω closer to 1.
    """

    tau: float = 5.0

    def __post_init__(self) -> None:
        if self.tau <= 0:
            raise ValueError(f"config key 'moe.router_options.tau': must be > 0, got {self.tau}")


@register_router("soft", SoftOptions)
class SoftSliceRouter(Router):
    """EMTAL's soft router: p = softmax(LN(x) W_r / τ) over all E slices (the block uses ω = E · p).

    W_r starts at zero, so a fresh block has ω ≡ 1 and computes exactly the pretrained FFN; its
    gradient is still non-zero (the softmax Jacobian at the uniform point is not), so it trains.

    Args:
        dim: D.
        num_experts: E.
        tau: Temperature τ; a larger τ keeps ω closer to 1.
    """

    families = ("moefied",)

    def __init__(self, dim: int, num_experts: int, tau: float = 5.0):
        super().__init__()
        if tau <= 0:
            raise ValueError(f"config key 'moe.router_options.tau': must be > 0, got {tau}")
        self.num_experts, self.top_k, self.tau = num_experts, num_experts, tau
        self.weight_DE = nn.Parameter(torch.zeros(dim, num_experts))

    @classmethod
    def from_options(cls, options: SoftOptions, shape: RouterShape) -> SoftSliceRouter:
        """The router of one MoEfied block (`Router.from_options`)."""
        return cls(shape.dim, shape.num_experts, options.tau)

    def forward(
        self, x_TD: torch.Tensor, valid_T: torch.Tensor | None = None, task_T: torch.Tensor | None = None
    ) -> RouterOutput:
        """Probabilities over every slice (ids_TK = 0..E-1 for each token); no auxiliary loss."""
        # At least fp32, as in TopKRouter; float64 inputs stay float64 so ω ≡ 1 is exact in tests.
        dtype = torch.promote_types(x_TD.dtype, torch.float32)
        ln_TD = Fn.layer_norm(x_TD.to(dtype), (x_TD.shape[-1],))
        probs_TE = (ln_TD @ self.weight_DE.to(dtype) / self.tau).softmax(dim=-1)
        ids_TE = torch.arange(self.num_experts, device=x_TD.device).expand(x_TD.shape[0], -1)
        zero = probs_TE.new_zeros(())
        return RouterOutput(weights_TK=probs_TE.to(x_TD.dtype), ids_TK=ids_TE, aux_loss=zero)
