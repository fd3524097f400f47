"""Merging expert deltas in weight space.

ΔW = B·A per expert is formed first; A and B factors are never averaged separately (that adds cross
terms between experts).

Shape legend: E experts, O output features, I input features.
"""

from __future__ import annotations

import torch


def weighted_average(deltas_EOI: torch.Tensor, weights_E: torch.Tensor) -> torch.Tensor:
    """sum_e w_e ΔW_e with the weights normalised to sum to one.

    Args:
        deltas_EOI: Per-expert weight deltas.
        weights_E: Non-negative weights (e.g. each expert's share of gate mass).

    Raises:
        ValueError: For a shape mismatch, negative weights or weights summing to zero.
    """
    if weights_E.shape != deltas_EOI.shape[:1]:
        raise ValueError(f"weights {tuple(weights_E.shape)} do not match {deltas_EOI.shape[0]} experts")
    if (weights_E < 0).any() or weights_E.sum() <= 0:
        raise ValueError("merge weights must be non-negative and not all zero")
    w_E = (weights_E / weights_E.sum()).to(deltas_EOI.dtype)
    return torch.einsum("e,eoi->oi", w_E, deltas_EOI)
