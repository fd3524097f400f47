"""The MoE-LoRA block: router, dispatch and upcycled LoRA experts around one frozen SwiGLU FFN.

For SwiGLU with experts W_e = W + ΔW_e:
    sum_e g_e (W2 + ΔW2_e) h_e = W2 (sum_e g_e h_e) + sum_e g_e ΔW2_e h_e,
so W1 and W3 run once on x and W2 once on the gate-weighted sum: one dense FFN plus K small LoRA paths.

Shape legend: B batch, S sequence, T = B*S tokens, D hidden, F FFN width, E experts, K top-k,
N = T*K assignments sorted by expert.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from mtmoe.model.dispatch import combine, sort_by_expert
from mtmoe.model.experts import UpcycledLoRAExperts
from mtmoe.model.router import TopKRouter


@dataclass
class RoutingContext:
    """Per-forward information shared by every block of one model (not global: one per model).

    Attributes:
        valid_T: Bool mask of real tokens for the current forward (None = all real).
        task_T: Task id of every token (None when unknown).
        num_tasks: Rows of the utilization counters.
        record: When True, blocks add to their utilization counters.
        aux_losses: Auxiliary losses appended by the blocks during the current forward.
    """

    valid_T: torch.Tensor | None = None
    task_T: torch.Tensor | None = None
    num_tasks: int = 1
    record: bool = False
    aux_losses: list[torch.Tensor] = field(default_factory=list)


class MoELoRAFFN(nn.Module):
    """Replaces one SwiGLU FFN (an HF `*MLP` with gate_proj/up_proj/down_proj/act_fn).

    Args:
        base_mlp: The frozen dense FFN, used once per forward.
        router: Chooses K experts per token.
        experts: The per-expert LoRA factors.
        context: The model's shared routing context.
    """

    def __init__(
        self, base_mlp: nn.Module, router: TopKRouter, experts: UpcycledLoRAExperts, context: RoutingContext
    ):
        super().__init__()
        self.base, self.router, self.experts = base_mlp, router, experts
        self.context = context
        E = router.num_experts
        self.register_buffer(
            "util_tokens_XE", torch.zeros(context.num_tasks, E, dtype=torch.float64), persistent=False
        )
        self.register_buffer(
            "util_mass_XE", torch.zeros(context.num_tasks, E, dtype=torch.float64), persistent=False
        )

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        """Runs the block; appends the router's auxiliary loss to the context."""
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        ctx = self.context
        route = self.router(x_TD, ctx.valid_T)
        ctx.aux_losses.append(route.aux_loss)
        d = sort_by_expert(route.ids_TK, route.weights_TK, self.router.num_experts)
        if ctx.record:
            self._record(route.ids_TK, route.weights_TK)

        gate_TF = self.base.gate_proj(x_TD)
        up_TF = self.base.up_proj(x_TD)
        x_ND = x_TD[d.token_N]
        gate_NF = gate_TF[d.token_N] + self.experts.delta("gate", x_ND, d)
        up_NF = up_TF[d.token_N] + self.experts.delta("up", x_ND, d)
        weighted_h_NF = self.base.act_fn(gate_NF) * up_NF * d.weight_N[:, None]
        out_TD = self.base.down_proj(combine(weighted_h_NF, d, B * S))
        out_TD = out_TD + combine(self.experts.delta("down", weighted_h_NF, d), d, B * S)
        return out_TD.reshape(B, S, D)

    @torch.no_grad()
    def _record(self, ids_TK: torch.Tensor, weights_TK: torch.Tensor) -> None:
        ctx = self.context
        T, K = ids_TK.shape
        valid_T = (
            torch.ones(T, dtype=torch.bool, device=ids_TK.device) if ctx.valid_T is None else ctx.valid_T
        )
        task_T = torch.zeros(T, dtype=torch.long, device=ids_TK.device) if ctx.task_T is None else ctx.task_T
        E = self.router.num_experts
        cell_TK = (task_T[:, None] * E + ids_TK)[valid_T]
        w_TK = weights_TK.double()[valid_T]
        size = ctx.num_tasks * E
        self.util_tokens_XE += torch.bincount(cell_TK.reshape(-1), minlength=size).double().view(-1, E)
        self.util_mass_XE += torch.bincount(cell_TK.reshape(-1), w_TK.reshape(-1), minlength=size).view(-1, E)

    def reset_utilization(self) -> None:
        """Zeroes the utilization counters."""
        self.util_tokens_XE.zero_()
        self.util_mass_XE.zero_()
