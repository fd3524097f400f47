"""What every MoE block family shares: the per-model routing context and per-block utilization counters.

A block family (upcycled LoRA experts, MoEfied FFN slices, native HF MoE experts) subclasses `MoEBlock`,
reports its router's losses with `RoutingContext.add_route` and its dispatch with `RoutingContext.count`,
and calls `MoEBlock.record` when `context.record` is on.

Shape legend: T tokens, K experts per token, E experts, X tasks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from mtmoe.model.dispatch import Dispatch, dispatch


@dataclass
class RoutingContext:
    """Per-forward information shared by every block of one model (not global: one per model).

    Attributes:
        valid_T: Bool mask of real tokens for the current forward (None = all real).
        task_T: Task id of every token (None when unknown).
        num_tasks: Rows of the utilization counters.
        record: When True, blocks add to their utilization counters.
        aux_losses: Weighted router losses (load balance + z-loss) appended by the blocks during the
            current forward.
        aux_coef: Weight of the load-balance loss.
        z_coef: Weight of the router z-loss.
        routed: Assignments of real tokens since the last reset (training forwards only).
        dropped: Of those, how many were over capacity.
        fade_alpha: Router fading: the blocks blend from the routed MoE (1) to their faded form (0).
        replaying: True from the end of a model forward to the start of the next. Blocks run then only
            when gradient checkpointing re-runs them in the backward: they route as the forward did,
            but add no losses (a re-run's losses would keep the re-run's graph, every recomputed
            activation, alive until the next forward) and count nothing twice.
    """

    valid_T: torch.Tensor | None = None
    task_T: torch.Tensor | None = None
    num_tasks: int = 1
    record: bool = False
    aux_losses: list[torch.Tensor] = field(default_factory=list)
    aux_coef: float = 0.0
    z_coef: float = 0.0
    routed: int = 0
    dropped: int = 0
    fade_alpha: float = 1.0
    replaying: bool = False

    def add_route(self, route) -> None:
        """Adds a router's weighted auxiliary losses (a `RouterOutput`) to this forward's total."""
        if self.replaying:
            return
        loss = self.aux_coef * route.aux_loss
        if route.z_loss is not None and self.z_coef:
            loss = loss + self.z_coef * route.z_loss
        self.aux_losses.append(loss)

    def count(self, num_routed: int, num_dropped: int, training: bool) -> None:
        """Counts routed and capacity-dropped assignments of a training forward."""
        if training and not self.replaying:
            self.routed += num_routed
            self.dropped += num_dropped


class MoEBlock(nn.Module):
    """Base of every MoE block: E experts and tokens/gate-mass utilization counters per task.

    Args:
        num_experts: E, the experts of the whole block (all ranks).
        context: The model's shared routing context.
    """

    def __init__(self, num_experts: int, context: RoutingContext):
        super().__init__()
        self.num_experts = num_experts
        self.context = context
        zeros_XE = torch.zeros(context.num_tasks, num_experts, dtype=torch.float64)
        self.register_buffer("util_tokens_XE", zeros_XE, persistent=False)
        self.register_buffer("util_mass_XE", zeros_XE.clone(), persistent=False)

    def route(self, x_TD: torch.Tensor):
        """Runs `self.router` on the tokens and adds its weighted losses to the context.

        Returns:
            The router's `RouterOutput`.
        """
        ctx = self.context
        route = self.router(x_TD, ctx.valid_T, ctx.task_T)
        ctx.add_route(route)
        return route

    def dispatch_route(
        self,
        route,
        weights_TK: torch.Tensor,
        capacity_factor: float,
        record_weights_TK: torch.Tensor | None = None,
    ) -> Dispatch:
        """Groups a route's assignments by expert, counts them and records utilization.

        Args:
            route: The router's output (its ids and, for k >= 3 capacity priority, its scores).
            weights_TK: Gate weight of every assignment.
            capacity_factor: Applied in training only; evaluation routes dropless.
            record_weights_TK: The weights that go into the utilization counters (default: `weights_TK`).

        Returns:
            The `Dispatch` of the real tokens' assignments.
        """
        ctx = self.context
        capacity = capacity_factor if self.training else 0.0
        d = dispatch(
            route.ids_TK, weights_TK, self.num_experts, ctx.valid_T, capacity, priority_TK=route.scores_TK
        )
        ctx.count(d.num_routed, d.num_dropped, self.training)
        if ctx.record:
            self.record(route.ids_TK, weights_TK if record_weights_TK is None else record_weights_TK)
        return d

    @torch.no_grad()
    def record(self, ids_TK: torch.Tensor, weights_TK: torch.Tensor) -> None:
        """Adds tokens and gate mass per (task, expert) of the real tokens to the counters."""
        ctx = self.context
        if ctx.replaying:
            return
        T = ids_TK.shape[0]
        valid_T = (
            torch.ones(T, dtype=torch.bool, device=ids_TK.device) if ctx.valid_T is None else ctx.valid_T
        )
        task_T = torch.zeros(T, dtype=torch.long, device=ids_TK.device) if ctx.task_T is None else ctx.task_T
        E = self.num_experts
        cell_TK = (task_T[:, None] * E + ids_TK)[valid_T]
        w_TK = weights_TK.double()[valid_T]
        size = ctx.num_tasks * E
        self.util_tokens_XE += torch.bincount(cell_TK.reshape(-1), minlength=size).double().view(-1, E)
        self.util_mass_XE += torch.bincount(cell_TK.reshape(-1), w_TK.reshape(-1), minlength=size).view(-1, E)

    def reset_utilization(self) -> None:
        """Zeroes the utilization counters."""
        self.util_tokens_XE.zero_()
        self.util_mass_XE.zero_()
