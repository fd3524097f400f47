"""Upcycled LoRA experts.

Per-expert LoRA factors on the gate, up and down projections of one shared, frozen SwiGLU FFN. Only the
factors live here; the frozen base stays in the block, once.

Shape legend: E experts, D hidden size, F FFN width, R LoRA rank, N sorted assignments.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mtmoe.model.dispatch import ExpertGroups, grouped_linear

PROJECTIONS = ("gate", "up", "down")


class UpcycledLoRAExperts(nn.Module):
    """LoRA factors for E experts, laid out for `grouped_mm` (input-major: x @ A_e @ B_e).

    Under expert parallelism a rank holds only the experts in `local`; the factors are drawn for all E
    experts and then sliced, so every `ep_size` starts from the same weights.

    Args:
        num_experts: E, experts of the whole block.
        dim: D.
        ffn_dim: F.
        rank: R.
        alpha: LoRA alpha; deltas are scaled by alpha / R.
        local: Global ids of the experts this module holds (default: all).
    """

    def __init__(
        self, num_experts: int, dim: int, ffn_dim: int, rank: int, alpha: float, local: slice | None = None
    ):
        super().__init__()
        self.scaling = alpha / rank
        local = local or slice(0, num_experts)
        self.first_expert = local.start
        shapes = {"gate": (dim, ffn_dim), "up": (dim, ffn_dim), "down": (ffn_dim, dim)}
        for proj, (fan_in, fan_out) in shapes.items():
            bound = 1.0 / math.sqrt(fan_in)  # LoRA's kaiming-uniform(a=sqrt(5)) bound for A
            a_EIR = torch.empty(num_experts, fan_in, rank).uniform_(-bound, bound)
            self.register_parameter(f"{proj}_a", nn.Parameter(a_EIR[local].clone()))
            self.register_parameter(
                f"{proj}_b", nn.Parameter(torch.zeros(num_experts, rank, fan_out)[local].clone())
            )

    @property
    def num_local(self) -> int:
        """Experts held by this module."""
        return self.gate_a.shape[0]

    def factors(self, proj: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The (A_EIR, B_ERO) factors of one projection."""
        return getattr(self, f"{proj}_a"), getattr(self, f"{proj}_b")

    def delta(self, proj: str, x_NI: torch.Tensor, d: ExpertGroups) -> torch.Tensor:
        """Scaling * x @ A_e @ B_e for each assignment row, grouped by expert."""
        a_EIR, b_ERO = self.factors(proj)
        # A as a column-major view (a copy of a small factor): a wide-by-thin grouped_mm runs about twice
        # as fast on CPU with it. The scaling goes on the R columns of x A, not on the O of the output.
        a_EIR = a_EIR.to(x_NI.dtype).transpose(1, 2).contiguous().transpose(1, 2)
        xa_NR = grouped_linear(x_NI, a_EIR, d) * self.scaling
        return grouped_linear(xa_NR, b_ERO.to(x_NI.dtype), d)

    def stacked_a(self, projs: tuple[str, ...], dtype: torch.dtype) -> torch.Tensor:
        """The A factors of `projs` (same fan-in) side by side, expert-major: (I, L·P·R), P = len(projs).

        Column block (e, p) holds A_e of projection p, so `x @ stacked_a(...)` viewed as (T, L, P·R) gives
        every expert's rank-R rows of every projection in one dense matmul.
        """
        a_EIPR = torch.stack([self.factors(proj)[0] for proj in projs], dim=2)
        E, fan_in, P, R = a_EIPR.shape
        return a_EIPR.to(dtype).transpose(0, 1).reshape(fan_in, E * P * R)

    def merged_delta(self, proj: str, x_TI: torch.Tensor, shares: torch.Tensor) -> torch.Tensor:
        """The rows times (Σ_e u_e ΔW_e)ᵀ, through the stacked low-rank factors (no dense ΔW is formed).

        With A = [A_1 … A_E] and B = [u_1 B_1; …; u_E B_E] this is scaling · (x A) B: rank E·R.

        Args:
            proj: `gate`, `up` or `down`.
            x_TI: Input rows.
            shares: u, one weight per expert (E,), or one per row and expert (T, E).
        """
        a_EIR, b_ERO = self.factors(proj)
        E, fan_in, R = a_EIR.shape
        a_IX = a_EIR.to(x_TI.dtype).permute(1, 0, 2).reshape(fan_in, E * R)
        b_XO = b_ERO.to(x_TI.dtype).reshape(E * R, -1)
        if shares.dim() == 1:
            b_XO = (b_ERO.to(x_TI.dtype) * shares.to(x_TI.dtype)[:, None, None]).reshape(E * R, -1)
            return (x_TI @ a_IX) @ b_XO * self.scaling
        xa_TER = (x_TI @ a_IX).view(-1, E, R) * shares.to(x_TI.dtype)[:, :, None]
        return xa_TER.reshape(-1, E * R) @ b_XO * self.scaling

    def weight_delta(self, proj: str, experts: slice | int = slice(None)) -> torch.Tensor:
        """Per-expert ΔW in `nn.Linear` layout (E, out, in): scaling * (A_e @ B_e)^T, in fp32.

        `experts` picks some (a slice keeps the E dimension, an index drops it), without computing the rest.
        """
        a_EIR, b_ERO = self.factors(proj)
        a, b = a_EIR[experts].float(), b_ERO[experts].float()
        return (a @ b).transpose(-1, -2) * self.scaling
