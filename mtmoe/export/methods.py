"""The export's merge methods: a registry of named methods, each with its options dataclass.

A method turns the kept experts' deltas of one tensor and their shares (renormalised over the n kept
experts, summing to one) into one delta. `average` gives Σ u_e ΔW_e. The summing methods
(`task_arithmetic`, `dare`, `breadcrumbs`) see D_e = n·u_e·ΔW_e (with uniform shares, each expert's own
delta) and default to λ = 1/n, the average's scale. `ties` takes the deltas with the shares as weights:
its weighted disjoint mean at λ = 1 is on the average's scale for any shares. DARE draws each tensor's
masks from its own seed, derived from its `seed` option and the tensor's name.

A new method is one function here (or anywhere) with `@register_merge(name, Options)`; the export's
`--merge name` then chooses it, and the flags of its options' fields set them.

Shape legend: E experts, O output features, I input features.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from mtmoe.config import build_section, check
from mtmoe.config.registry import Registry
from mtmoe.export.merge import breadcrumbs, dare, task_arithmetic, tensor_seed, ties, weighted_average

MergeFn = Callable[[torch.Tensor, torch.Tensor, Any, str], torch.Tensor]


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: its function and its options' dataclass."""

    name: str
    merge: MergeFn
    options: type


MERGES: Registry[MergeMethod] = Registry("merge method", "--merge")


def register_merge(name: str, options: type) -> Callable[[MergeFn], MergeFn]:
    """Function decorator: `--merge name` (or `MergeSpec.of(name, ...)`) chooses the method."""

    def add(fn: MergeFn) -> MergeFn:
        MERGES.add(name, MergeMethod(name, fn, options))
        return fn

    return add


def merge_method(name: str) -> MergeMethod:
    """The registered method `name`.

    Raises:
        ValueError: Naming `--merge` and the registered methods.
    """
    return MERGES.lookup(name)


@dataclass(frozen=True)
class MergeSpec:
    """A merge method with its options, as the export applies it to every tensor.

    Attributes:
        method: A registered method (`MERGES`).
        options: An instance of the method's options dataclass (None = its defaults).
    """

    method: str = "average"
    options: Any = None

    @classmethod
    def of(cls, method: str, **options: Any) -> MergeSpec:
        """The spec of `method` with `options` checked against its dataclass (an unknown one is named)."""
        chosen = merge_method(method)
        takes = [f.name for f in dataclasses.fields(chosen.options)]
        for name in options:
            if name not in takes:
                raise ValueError(
                    f"--{name}: not an option of --merge {method} (its options: {takes or 'none'})"
                )
        return cls(method, build_section(chosen.options, options, "--"))

    def merge(self, deltas_EOI: torch.Tensor, shares_E: torch.Tensor, name: str = "") -> torch.Tensor:
        """One merged delta from the kept experts' deltas and their (renormalised) shares.

        Args:
            deltas_EOI: The kept experts' deltas of one tensor.
            shares_E: Their shares, summing to one.
            name: The tensor's module name: it seeds DARE's masks for this tensor.
        """
        chosen = merge_method(self.method)
        options = self.options if self.options is not None else chosen.options()
        return chosen.merge(deltas_EOI, shares_E, options, name)

    def record(self) -> dict[str, Any]:
        """The method and its options, for `mtmoe_export.json`."""
        options = self.options if self.options is not None else merge_method(self.method).options()
        return {"method": self.method, **dataclasses.asdict(options)}


def _summed(deltas_EOI: torch.Tensor, shares_E: torch.Tensor) -> torch.Tensor:
    """D_e = n·u_e·ΔW_e: each expert's delta at its share of the average's scale."""
    return deltas_EOI * (len(shares_E) * shares_E).to(deltas_EOI.dtype)[:, None, None]


def _lam(lam: float | None, n: int) -> float:
    return lam if lam is not None else 1.0 / n


@dataclass(kw_only=True)
class AverageOptions:
    """Options of `average` (none)."""


@register_merge("average", AverageOptions)
def merge_average(deltas_EOI, shares_E, options: AverageOptions, name: str) -> torch.Tensor:
    """Σ u_e ΔW_e."""
    return weighted_average(deltas_EOI, shares_E)


@dataclass(kw_only=True)
class SumOptions:
    """Options of `task_arithmetic`.

    Attributes:
        lam: λ of the sum (empty = 1/n, the average's scale).
    """

    lam: float | None = None


@register_merge("task_arithmetic", SumOptions)
def merge_task_arithmetic(deltas_EOI, shares_E, options: SumOptions, name: str) -> torch.Tensor:
    """λ · Σ_e D_e."""
    return task_arithmetic(_summed(deltas_EOI, shares_E), _lam(options.lam, len(shares_E)))


@dataclass(kw_only=True)
class TiesOptions:
    """Options of `ties`.

    Attributes:
        density: Fraction of each delta's entries (by magnitude) kept by the trim, in (0, 1].
        lam: Scale of the merged delta (empty = 1).
    """

    density: float = 0.2
    lam: float | None = None

    def __post_init__(self):
        check(0 < self.density <= 1, "--density", "in (0, 1]")


@register_merge("ties", TiesOptions)
def merge_ties(deltas_EOI, shares_E, options: TiesOptions, name: str) -> torch.Tensor:
    """TIES over the deltas, weighted by the shares."""
    return ties(deltas_EOI, options.density, 1.0 if options.lam is None else options.lam, shares_E)


@dataclass(kw_only=True)
class DareOptions:
    """Options of `dare`.

    Attributes:
        drop: Drop probability of each entry, in [0, 1).
        lam: λ of the sum (empty = 1/n).
        seed: The run's seed of the drop masks (each tensor's is `tensor_seed(seed, name)`).
    """

    drop: float = 0.5
    lam: float | None = None
    seed: int = 0

    def __post_init__(self):
        check(0 <= self.drop < 1, "--drop", "in [0, 1)")


@register_merge("dare", DareOptions)
def merge_dare(deltas_EOI, shares_E, options: DareOptions, name: str) -> torch.Tensor:
    """DARE on D_e, then λ · Σ, with this tensor's own masks."""
    lam = _lam(options.lam, len(shares_E))
    return dare(_summed(deltas_EOI, shares_E), options.drop, lam, tensor_seed(options.seed, name))


@dataclass(kw_only=True)
class BreadcrumbsOptions:
    """Options of `breadcrumbs`.

    Attributes:
        beta: Fraction of each delta's largest magnitudes removed (mergekit's `gamma`).
        gamma: Fraction of its smallest magnitudes removed.
        lam: λ of the sum (empty = 1/n).
    """

    beta: float = 0.01
    gamma: float = 0.8
    lam: float | None = None


@register_merge("breadcrumbs", BreadcrumbsOptions)
def merge_breadcrumbs(deltas_EOI, shares_E, options: BreadcrumbsOptions, name: str) -> torch.Tensor:
    """Model breadcrumbs on D_e, then λ · Σ."""
    lam = _lam(options.lam, len(shares_E))
    return breadcrumbs(_summed(deltas_EOI, shares_E), options.beta, options.gamma, lam)
