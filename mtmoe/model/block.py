"""The MoE-LoRA block: router, dispatch and upcycled LoRA experts around one frozen SwiGLU FFN.

For SwiGLU with experts W_e = W + ΔW_e:
    sum_e g_e (W2 + ΔW2_e) h_e = W2 (sum_e g_e h_e) + sum_e g_e ΔW2_e h_e,
so W1 and W3 run once on x and W2 once on the gate-weighted sum: one dense FFN plus K small LoRA paths.

Router fading (`moe.fade_fraction`) blends the block toward its merged expert, the FFN with
W + Σ_e u_e ΔW_e (u = each expert's measured share): out = α·MoE(x) + (1−α)·merged(x), α → 0. At α = 0
the block is exactly the dense FFN that the export folds to.

Under expert parallelism the LoRA paths of an assignment run on the rank that owns its expert: the rank
sends the row [x, W1 x, W3 x] and gets back [h_e, ΔW2_e h_e] (see `mtmoe.parallel.expert_parallel`).

Shape legend: B batch, S sequence, T = B*S tokens, D hidden, F FFN width, E experts, K top-k,
N = T*K assignments sorted by expert.
"""

from __future__ import annotations

import torch
from torch import nn

from mtmoe.model.dispatch import ExpertGroups, combine, dispatch
from mtmoe.model.experts import UpcycledLoRAExperts
from mtmoe.model.moe_base import MoEBlock, RoutingContext
from mtmoe.model.router import TopKRouter
from mtmoe.parallel.expert_parallel import ExpertPlacement, expert_parallel_apply


class MoELoRAFFN(MoEBlock):
    """Replaces one SwiGLU FFN (an HF `*MLP` with gate_proj/up_proj/down_proj/act_fn).

    Args:
        base_mlp: The frozen dense FFN, used once per forward.
        router: Chooses K experts per token.
        experts: The per-expert LoRA factors (this rank's share of them under expert parallelism).
        context: The model's shared routing context.
        placement: Where the experts live (default: all on this rank).
        capacity_factor: 0 for dropless routing, else the per-rank expert capacity factor (training
            only; evaluation is always dropless).
    """

    def __init__(
        self,
        base_mlp: nn.Module,
        router: TopKRouter,
        experts: UpcycledLoRAExperts,
        context: RoutingContext,
        placement: ExpertPlacement | None = None,
        capacity_factor: float = 0.0,
    ):
        super().__init__(router.num_experts, context)
        self.base, self.router, self.experts = base_mlp, router, experts
        self.placement = placement or ExpertPlacement(router.num_experts)
        self.capacity_factor = capacity_factor
        E = router.num_experts
        # Router fading's constant gates (each expert's measured share); set when fading starts.
        self.register_buffer("fade_shares_E", torch.full((E,), 1.0 / E), persistent=False)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        """Runs the block; appends the router's auxiliary loss to the context."""
        B, S, D = x_BSD.shape
        T = B * S
        x_TD = x_BSD.reshape(T, D)
        ctx = self.context
        route = self.router(x_TD, ctx.valid_T, ctx.task_T)
        ctx.add_route(route)
        capacity = self.capacity_factor if self.training else 0.0
        d = dispatch(route.ids_TK, route.weights_TK, self.router.num_experts, ctx.valid_T, capacity)
        ctx.count(d.num_routed, d.num_dropped, self.training)
        if ctx.record:
            self.record(route.ids_TK, route.weights_TK)

        gate_TF = self.base.gate_proj(x_TD)
        up_TF = self.base.up_proj(x_TD)
        x_ND, gate_NF, up_NF = x_TD[d.token_N], gate_TF[d.token_N], up_TF[d.token_N]
        if self.placement.ep_size == 1:
            h_NF, down_ND = self.expert_outputs(x_ND, gate_NF, up_NF, d.groups)
        else:
            h_NF, down_ND = self._remote_expert_outputs(x_ND, gate_NF, up_NF, d.groups.counts_E)
        w_N1 = d.weight_N[:, None]
        h_TF = combine(h_NF * w_N1, d, T)
        if d.dropped_weight_T is not None:  # dropped assignments (and padding) keep the frozen FFN
            h_TF = h_TF + self.base.act_fn(gate_TF) * up_TF * d.dropped_weight_T[:, None].to(h_TF.dtype)
        out_TD = self.base.down_proj(h_TF) + combine(down_ND * w_N1, d, T)
        alpha = ctx.fade_alpha
        if alpha < 1.0:
            out_TD = alpha * out_TD + (1.0 - alpha) * self._merged_expert(x_TD, gate_TF, up_TF)
        return out_TD.reshape(B, S, D)

    def _merged_expert(self, x_TD: torch.Tensor, gate_TF: torch.Tensor, up_TF: torch.Tensor) -> torch.Tensor:
        """The FFN with W + Σ_e u_e ΔW_e on every projection: exactly what the export folds to."""
        ex, u_E = self.experts, self.fade_shares_E
        gate_TF = gate_TF + ex.merged_delta("gate", x_TD, u_E)
        h_TF = self.base.act_fn(gate_TF) * (up_TF + ex.merged_delta("up", x_TD, u_E))
        return self.base.down_proj(h_TF) + ex.merged_delta("down", h_TF, u_E)

    def expert_outputs(
        self, x_ND: torch.Tensor, gate_NF: torch.Tensor, up_NF: torch.Tensor, groups: ExpertGroups
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs this rank's experts on rows grouped by (local) expert.

        Args:
            x_ND: Block inputs.
            gate_NF: The frozen W1 x of the same rows.
            up_NF: The frozen W3 x of the same rows.
            groups: Rows per local expert.

        Returns:
            (h_e, ΔW2_e h_e) per row, both without the gate weight.
        """
        ex = self.experts
        h_NF = self.base.act_fn(gate_NF + ex.delta("gate", x_ND, groups)) * (
            up_NF + ex.delta("up", x_ND, groups)
        )
        return h_NF, ex.delta("down", h_NF, groups)

    def _remote_expert_outputs(
        self, x_ND: torch.Tensor, gate_NF: torch.Tensor, up_NF: torch.Tensor, counts_E: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`expert_outputs`, each row computed by the rank that owns its expert."""
        D, F = x_ND.shape[1], gate_NF.shape[1]

        def local(rows_MC: torch.Tensor, counts_L: torch.Tensor) -> torch.Tensor:
            x_MD, gate_MF, up_MF = rows_MC.split([D, F, F], dim=1)
            groups = ExpertGroups.from_counts(counts_L.to(rows_MC.device))
            return torch.cat(self.expert_outputs(x_MD, gate_MF, up_MF, groups), dim=1)

        rows_NC = torch.cat([x_ND, gate_NF, up_NF], dim=1)
        out_NC = expert_parallel_apply(rows_NC, counts_E, self.placement, local)
        h_NF, down_ND = out_NC.split([F, D], dim=1)
        return h_NF, down_ND
