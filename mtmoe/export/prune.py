"""Which experts an export keeps, and how much each one weighs.

Utilization (see `mtmoe.eval.utilization`) counts, per task, layer and expert, the routed tokens and the
gate mass on the held-out set. An export weighs each expert by its share of gate mass, over all tasks
(`task=None`) or for one task, and can keep only the top n experts of every layer, ranked by that
share, or n at random (a baseline). The shares are then renormalised over the kept experts, as a
router renormalised over what remains would be.

Shape legend: E experts.
"""

from __future__ import annotations

import torch


def keep_experts(
    shares: dict[int, torch.Tensor], n: int, by: str = "utilization", seed: int = 0
) -> dict[int, list[int]]:
    """The n experts kept in every layer: the n largest shares (ties to the lower id), or n at random.

    Raises:
        ValueError: For n outside [1, E] or an unknown `by`.
    """
    kept = {}
    gen = torch.Generator().manual_seed(seed)
    for layer, share_E in sorted(shares.items()):
        E = len(share_E)
        if not 1 <= n <= E:
            raise ValueError(f"--prune {n}: keep between 1 and {E} experts")
        if by == "utilization":
            order = sorted(range(E), key=lambda e: (-float(share_E[e]), e))
        elif by == "random":
            order = torch.randperm(E, generator=gen).tolist()
        else:
            raise ValueError(f"--prune-by {by!r}: expected utilization|random")
        kept[layer] = sorted(order[:n])
    return kept


def renormalise(shares: dict[int, torch.Tensor], kept: dict[int, list[int]]) -> dict[int, torch.Tensor]:
    """Shares with the dropped experts at zero and the kept ones summing to one (uniform if all zero)."""
    out = {}
    for layer, share_E in shares.items():
        mask_E = torch.zeros_like(share_E)
        mask_E[kept[layer]] = 1.0
        masked_E = share_E * mask_E
        out[layer] = masked_E / masked_E.sum() if masked_E.sum() > 0 else mask_E / mask_E.sum()
    return out
