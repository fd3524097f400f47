"""Merging expert deltas in weight space: pure functions over a stack of ΔW tensors.

ΔW = B·A per expert is formed first; A and B factors are never merged separately (that adds cross terms
between experts, PEFT #3004). Every method takes `deltas_EOI` (one delta per expert, or per task) and
returns one delta of shape (O, I) to add to the frozen weight.

- `weighted_average`: Σ_e w_e ΔW_e, weights normalised (uniform = the plain average).
- `task_arithmetic`: λ · Σ_e ΔW_e (Ilharco et al., 2023).
- `ties`: trim each ΔW_e to its top-`density` magnitudes, elect a sign per entry by total weighted mass,
  take the weighted mean of the entries that agree with it, times λ (Yadav et al., 2023).
- `dare`: drop each entry with probability p and rescale the kept ones by 1/(1−p) (seeded), then task
  arithmetic (Yu et al., 2024).
- `breadcrumbs`: per ΔW_e, zero the largest β fraction (outliers) and the smallest γ fraction of
  magnitudes, then task arithmetic (Davari & Belilovsky, 2024).

Counts of entries are exact integers: a fraction f of n entries is read as the decimal it prints as
(0.3 is 3/10, not its binary neighbour), and TIES keeps ⌈f·n⌉ while breadcrumbs removes ⌊β·n⌋ and ⌊γ·n⌋.
So no method ever keeps fewer entries than asked.

Shape legend: E experts (or tasks), O output features, I input features.
"""

from __future__ import annotations

import hashlib
import math
from fractions import Fraction

import torch


def fraction_count(fraction: float, n: int, up: bool) -> int:
    """⌈fraction·n⌉ (`up`) or ⌊fraction·n⌋, computed exactly.

    The fraction is read as the decimal Python prints for it, so `fraction_count(0.3, 10, True)` is 3
    (float arithmetic gives 0.3·10 = 3.0000000000000004 and a ceil of 4).
    """
    exact = Fraction(repr(float(fraction))) * n
    return math.ceil(exact) if up else math.floor(exact)


def tensor_seed(seed: int, name: str) -> int:
    """A seed for one tensor's random masks, derived from the run's seed and the tensor's name.

    Different tensors get independent masks; the same (seed, name) always gets the same one.
    """
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _check(deltas_EOI: torch.Tensor) -> None:
    if deltas_EOI.dim() != 3 or deltas_EOI.shape[0] == 0:
        raise ValueError(f"expected a stack of deltas (E, O, I), got shape {tuple(deltas_EOI.shape)}")


def _weights(deltas_EOI: torch.Tensor, weights_E: torch.Tensor | None) -> torch.Tensor:
    """Validated non-negative weights in the deltas' dtype (None = all ones)."""
    if weights_E is None:
        return torch.ones(deltas_EOI.shape[0], dtype=deltas_EOI.dtype, device=deltas_EOI.device)
    if weights_E.shape != deltas_EOI.shape[:1]:
        raise ValueError(f"weights {tuple(weights_E.shape)} do not match {deltas_EOI.shape[0]} experts")
    if (weights_E < 0).any() or weights_E.sum() <= 0:
        raise ValueError("merge weights must be non-negative and not all zero")
    return weights_E.to(deltas_EOI.dtype, copy=True).to(deltas_EOI.device)


def weighted_average(deltas_EOI: torch.Tensor, weights_E: torch.Tensor | None = None) -> torch.Tensor:
    """sum_e w_e ΔW_e with the weights normalised to sum to one (None = uniform).

    Args:
        deltas_EOI: Per-expert weight deltas.
        weights_E: Non-negative weights (e.g. each expert's share of gate mass).

    Raises:
        ValueError: For a shape mismatch, negative weights or weights summing to zero.
    """
    _check(deltas_EOI)
    weights_E = _weights(deltas_EOI, weights_E)
    w_E = weights_E / weights_E.sum()
    return torch.einsum("e,eoi->oi", w_E, deltas_EOI)


def task_arithmetic(deltas_EOI: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """λ · Σ_e ΔW_e."""
    _check(deltas_EOI)
    return lam * deltas_EOI.sum(0)


def _keep_top(delta_OI: torch.Tensor, density: float) -> torch.Tensor:
    """`delta_OI` with all but its ⌈density·n⌉ largest magnitudes set to zero (ties broken by position)."""
    n = delta_OI.numel()
    k = min(n, fraction_count(density, n, up=True))
    flat = delta_OI.reshape(-1)
    keep = torch.zeros(n, dtype=torch.bool, device=flat.device)
    if k:
        keep[flat.abs().topk(k).indices] = True
    return torch.where(keep, flat, torch.zeros_like(flat)).reshape(delta_OI.shape)


def ties(
    deltas_EOI: torch.Tensor, density: float = 0.2, lam: float = 1.0, weights_E: torch.Tensor | None = None
) -> torch.Tensor:
    """TIES merging: trim, elect sign, weighted disjoint mean, times λ.

    Each delta is trimmed to its ⌈density·n⌉ largest magnitudes, then weighed by w_e. Per entry, the
    sign with the larger total weighted mass is elected (an entry whose mass sums to exactly 0 elects
    no sign and merges to 0). The merged entry is Σ_e w_e ΔW_e / Σ_e w_e over the experts that agree
    with it, so with λ = 1 the result stays on the weighted average's scale for any weights: an expert
    of weight 0 takes no part, and one expert alone gives back its own delta.

    Args:
        deltas_EOI: Per-expert deltas.
        density: Fraction of each delta's entries (by magnitude) that survive the trim.
        lam: Scale of the merged delta.
        weights_E: Non-negative expert weights (None = equal: the plain disjoint mean).
    """
    _check(deltas_EOI)
    if not 0 < density <= 1:
        raise ValueError(f"ties density must be in (0, 1], got {density}")
    weights_E = _weights(deltas_EOI, weights_E)
    trimmed_EOI = torch.stack([_keep_top(d, density) for d in deltas_EOI])
    weighted_EOI = trimmed_EOI * weights_E[:, None, None]
    sign_OI = torch.sign(weighted_EOI.sum(0))  # the sign with the larger total mass
    agree_EOI = (torch.sign(weighted_EOI) == sign_OI) & (weighted_EOI != 0)
    mass_OI = (weights_E[:, None, None] * agree_EOI).sum(0)
    mass_OI = torch.where(mass_OI > 0, mass_OI, torch.ones_like(mass_OI))  # no agreeing expert: entry 0
    return lam * (weighted_EOI * agree_EOI).sum(0) / mass_OI


def dare(deltas_EOI: torch.Tensor, drop: float = 0.5, lam: float = 1.0, seed: int = 0) -> torch.Tensor:
    """DARE: drop entries with probability `drop`, rescale survivors by 1/(1−drop), then λ · Σ.

    Args:
        deltas_EOI: Per-expert deltas.
        drop: Drop probability p in [0, 1).
        lam: Scale of the merged delta.
        seed: Seed of the drop masks (the same seed gives the same merge). Give every tensor its own
            seed (`tensor_seed`): one seed for all would draw the same masks for every tensor of a shape.
    """
    _check(deltas_EOI)
    if not 0 <= drop < 1:
        raise ValueError(f"dare drop rate must be in [0, 1), got {drop}")
    gen = torch.Generator().manual_seed(seed)
    keep_EOI = (torch.rand(deltas_EOI.shape, generator=gen) >= drop).to(deltas_EOI.device)
    return task_arithmetic(deltas_EOI * keep_EOI / (1 - drop), lam)


def breadcrumbs(
    deltas_EOI: torch.Tensor, beta: float = 0.01, gamma: float = 0.8, lam: float = 1.0
) -> torch.Tensor:
    """Model breadcrumbs: per delta, drop the top-β outliers and the bottom-γ small entries, then λ · Σ.

    ⌊β·n⌋ entries of largest and ⌊γ·n⌋ of smallest magnitude are removed from each delta of n entries.

    Args:
        deltas_EOI: Per-expert deltas.
        beta: Fraction of the largest magnitudes removed (mergekit calls it `gamma`).
        gamma: Fraction of the smallest magnitudes removed.
        lam: Scale of the merged delta.
    """
    _check(deltas_EOI)
    if not (0 <= beta and 0 <= gamma and beta + gamma < 1):
        raise ValueError(f"breadcrumbs needs beta, gamma >= 0 with beta + gamma < 1, got {beta}, {gamma}")
    masked = []
    for d_OI in deltas_EOI:
        n = d_OI.numel()
        order = d_OI.abs().reshape(-1).argsort()  # ascending magnitude
        keep = torch.zeros(n, dtype=torch.bool, device=d_OI.device)
        low, high = fraction_count(gamma, n, up=False), n - fraction_count(beta, n, up=False)
        keep[order[low:high]] = True
        masked.append(torch.where(keep.reshape(d_OI.shape), d_OI, torch.zeros_like(d_OI)))
    return task_arithmetic(torch.stack(masked), lam)


METHODS = {
    "average": weighted_average,
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "dare": dare,
    "breadcrumbs": breadcrumbs,
}
