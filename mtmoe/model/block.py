"""The MoE-LoRA block: router, dispatch and upcycled LoRA experts around one frozen SwiGLU FFN.

For SwiGLU with experts W_e = W + ΔW_e:
    sum_e g_e (W2 + ΔW2_e) h_e = W2 (sum_e g_e h_e) + sum_e g_e ΔW2_e h_e,
so W1 and W3 run once on x and W2 once on the gate-weighted sum: one dense FFN plus K small LoRA paths.

Router fading (`moe.fade_fraction`) blends the block toward its merged expert, the FFN with
W + Σ_e u_e ΔW_e (u = each expert's measured share): out = α·MoE(x) + (1−α)·merged(x), α → 0. At α = 0
the block is exactly the dense FFN that the export folds to.

Shared experts (`moe.shared_experts`, MTLoRA's task-agnostic LoRA, DeepSeek's shared expert) are LoRA
factors that every token uses: they join the frozen weights, so each routed expert is W + ΔW_s + ΔW_e.

With MOELoRA's per-task gate (`moe.task_routing: gate`) every token of task t mixes all experts per
projection, W + ΔW_s + Σ_e g_{t,e} ΔW_e, so each task has an exact dense model.

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
from mtmoe.model.router import RouterOutput, TaskGateRouter, TopKRouter
from mtmoe.parallel.expert_parallel import ExpertPlacement, expert_parallel_apply


class MoELoRAFFN(MoEBlock):
    """Replaces one SwiGLU FFN (an HF `*MLP` with gate_proj/up_proj/down_proj/act_fn).

    Args:
        base_mlp: The frozen dense FFN, used once per forward.
        router: Chooses K experts per token, or a per-task gate over all experts.
        experts: The per-expert LoRA factors (this rank's share of them under expert parallelism).
        context: The model's shared routing context.
        placement: Where the experts live (default: all on this rank).
        capacity_factor: 0 for dropless routing, else the per-rank expert capacity factor (training
            only; evaluation is always dropless).
        shared: Always-on LoRA experts (None = none).
    """

    def __init__(
        self,
        base_mlp: nn.Module,
        router: TopKRouter | TaskGateRouter,
        experts: UpcycledLoRAExperts,
        context: RoutingContext,
        placement: ExpertPlacement | None = None,
        capacity_factor: float = 0.0,
        shared: UpcycledLoRAExperts | None = None,
    ):
        super().__init__(router.num_experts, context)
        self.base, self.router, self.experts, self.shared = base_mlp, router, experts, shared
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
        gate_TF, up_TF = self.base.gate_proj(x_TD), self.base.up_proj(x_TD)
        if self.shared is not None:
            gate_TF = gate_TF + self._shared_delta("gate", x_TD)
            up_TF = up_TF + self._shared_delta("up", x_TD)
        if isinstance(self.router, TaskGateRouter):
            return self._task_gated(x_TD, gate_TF, up_TF).reshape(B, S, D)
        route = self.router(x_TD, ctx.valid_T, ctx.task_T)
        ctx.add_route(route)
        capacity = self.capacity_factor if self.training else 0.0
        d = dispatch(route.ids_TK, route.weights_TK, self.router.num_experts, ctx.valid_T, capacity)
        ctx.count(d.num_routed, d.num_dropped, self.training)
        if ctx.record:
            self.record(route.ids_TK, route.weights_TK)

        x_ND, gate_NF, up_NF = x_TD[d.token_N], gate_TF[d.token_N], up_TF[d.token_N]
        if self.placement.ep_size == 1:
            h_NF, down_ND = self.expert_outputs(x_ND, gate_NF, up_NF, d.groups)
        else:
            h_NF, down_ND = self._remote_expert_outputs(x_ND, gate_NF, up_NF, d.groups.counts_E)
        w_N1 = d.weight_N[:, None]
        h_TF = combine(h_NF * w_N1, d, T)
        if d.dropped_weight_T is not None:  # dropped assignments (and padding) keep the frozen FFN
            h_TF = h_TF + self.base.act_fn(gate_TF) * up_TF * d.dropped_weight_T[:, None].to(h_TF.dtype)
        out_TD = self._down(h_TF) + combine(down_ND * w_N1, d, T)
        alpha = ctx.fade_alpha
        if alpha < 1.0:
            out_TD = alpha * out_TD + (1.0 - alpha) * self._merged_expert(x_TD, gate_TF, up_TF)
        return out_TD.reshape(B, S, D)

    def _merged_expert(self, x_TD: torch.Tensor, gate_TF: torch.Tensor, up_TF: torch.Tensor) -> torch.Tensor:
        """The FFN with W + Σ_e u_e ΔW_e on every projection: exactly what the export folds to."""
        ex, u_E = self.experts, self.fade_shares_E
        gate_TF = gate_TF + ex.merged_delta("gate", x_TD, u_E)
        h_TF = self.base.act_fn(gate_TF) * (up_TF + ex.merged_delta("up", x_TD, u_E))
        return self._down(h_TF) + ex.merged_delta("down", h_TF, u_E)

    def _task_gated(self, x_TD: torch.Tensor, gate_TF: torch.Tensor, up_TF: torch.Tensor) -> torch.Tensor:
        """Every token mixes all experts per projection with its task's gate: W + Σ_e g_{t,e} ΔW_e."""
        ctx, ex = self.context, self.experts
        T, E = x_TD.shape[0], self.num_experts
        g_TE = self.router.gates(ctx.task_T, T)
        ids_TE = torch.arange(E, device=x_TD.device).expand(T, E)
        ctx.add_route(RouterOutput(weights_TK=g_TE, ids_TK=ids_TE, aux_loss=g_TE.new_zeros(())))
        if ctx.record:
            self.record(ids_TE, g_TE)
        gate_TF = gate_TF + ex.merged_delta("gate", x_TD, g_TE)
        h_TF = self.base.act_fn(gate_TF) * (up_TF + ex.merged_delta("up", x_TD, g_TE))
        return self._down(h_TF) + ex.merged_delta("down", h_TF, g_TE)

    def _shared_delta(self, proj: str, x_TI: torch.Tensor) -> torch.Tensor:
        ones_S = x_TI.new_ones(self.shared.num_local)
        return self.shared.merged_delta(proj, x_TI, ones_S)

    def _down(self, h_TF: torch.Tensor) -> torch.Tensor:
        """The frozen W2 plus the shared experts' ΔW2."""
        out_TD = self.base.down_proj(h_TF)
        return out_TD if self.shared is None else out_TD + self._shared_delta("down", h_TF)

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
