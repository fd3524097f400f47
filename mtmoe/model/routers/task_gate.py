"""MOELoRA's per-task gate (`moe.router: task_gate`): each task mixes every expert with its own weights.

Shape legend: T tokens, E experts, X tasks.
"""

from __future__ import annotations

import torch
from torch import nn

from mtmoe.model.routers.base import NoOptions, Router, RouterShape, register_router


@register_router("task_gate")
class TaskGateRouter(Router):
    """MOELoRA's per-task gate: every token of task t mixes all E experts with softmax(g_t).

    The gate does not depend on the token, so the block mixes the experts per projection
    (W + Σ_e g_{t,e} ΔW_e) and each task has an exact dense model.

    Args:
        num_experts: E.
        num_tasks: X.
    """

    per_task = True

    def __init__(self, num_experts: int, num_tasks: int):
        super().__init__()
        self.num_experts, self.top_k = num_experts, num_experts
        self.task_logits_XE = nn.Parameter(torch.zeros(num_tasks, num_experts))  # uniform gates at first

    @classmethod
    def from_options(cls, options: NoOptions, shape: RouterShape) -> TaskGateRouter:
        """The gate of one block (`Router.from_options`)."""
        return cls(shape.num_experts, shape.num_tasks)

    @classmethod
    def task_aware(cls, options: NoOptions) -> bool:
        """Its gates are task-routing tensors."""
        return True

    def gates(self, task_T: torch.Tensor | None, num_tokens: int) -> torch.Tensor:
        """Per token, the softmax gate of its task (task 0 when unknown)."""
        gates_XE = self.task_logits_XE.float().softmax(dim=-1)
        if task_T is None:
            return gates_XE[0].expand(num_tokens, -1)
        return gates_XE[task_T]
