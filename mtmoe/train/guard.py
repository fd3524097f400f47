"""Non-finite guard: a NaN or inf loss or gradient on any rank skips the step on every rank.

Each trainable parameter's gradient is checked as autograd produces it (a hook, no host sync), and
every micro-batch loss too. Before the optimizer step the ranks agree with one all-reduce (MAX), so
either every rank applies the step or none does. A skipped step leaves the weights and the AdamW
moments untouched (`mtmoe.parallel.engine.SkippableAdamW`); the loop counts it, logs it, and stops
after too many in a row.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class NonFiniteGuard:
    """Watches the losses and gradients of one optimizer step on this rank.

    Args:
        model: The trained module (its trainable parameters get a gradient hook).
    """

    def __init__(self, model: nn.Module):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.bad = torch.zeros((), dtype=torch.bool, device=self.params[0].device)
        self.handles = [p.register_hook(self._check_grad) for p in self.params]

    def _check_grad(self, grad: torch.Tensor) -> None:
        self.bad |= ~torch.isfinite(grad).all()

    def check_loss(self, loss: torch.Tensor) -> None:
        """Flags a non-finite loss."""
        self.bad |= ~torch.isfinite(loss.detach()).all()

    def agree(self) -> bool:
        """True when any rank saw a non-finite loss or gradient since the last call (a collective)."""
        flag = self.bad.to(torch.float32).reshape(1)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.bad.zero_()
        return bool(flag.item())

    def remove(self) -> None:
        """Removes the gradient hooks."""
        for h in self.handles:
            h.remove()
