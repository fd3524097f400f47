"""Plain LoRA on a frozen `nn.Linear` (used on the attention projections)."""

from __future__ import annotations

import math

import torch
from torch import nn


class LoRALinear(nn.Module):
    """y = base(x) + scaling * x A B, with A (in, R) and B (R, out); B starts at zero.

    Args:
        base: The frozen linear layer.
        rank: R.
        alpha: scaling = alpha / R.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.scaling = alpha / rank
        bound = 1.0 / math.sqrt(base.in_features)
        self.lora_a = nn.Parameter(torch.empty(base.in_features, rank).uniform_(-bound, bound))
        self.lora_b = nn.Parameter(torch.zeros(rank, base.out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Base projection plus the LoRA path."""
        return self.base(x) + (x @ self.lora_a.to(x.dtype)) @ self.lora_b.to(x.dtype) * self.scaling

    def weight_delta(self) -> torch.Tensor:
        """ΔW in `nn.Linear` layout (out, in), fp32."""
        return (self.lora_a.float() @ self.lora_b.float()).t() * self.scaling
