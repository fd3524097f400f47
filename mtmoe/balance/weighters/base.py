"""The task-weighter contract.

Every step the trainer asks for weights, uses them in the loss, and after the step reports the global
(all-ranks) per-task token-mean training losses of that step. Weights for step t therefore depend only
on losses up to step t-1, so every rank computes the same weights without extra communication, and a
resumed run continues with the same weights (their whole state is in `state_dict`).

The total loss is  sum_k w_k L_k / sum_k w_k  over the tasks present in the global batch (`normalize_by`
"weight_sum", MFTCoder's form): its scale depends neither on which tasks a batch holds nor on the weights'
overall scale, only on their ratios. A weighter whose weights carry an absolute scale (uncertainty
weighting's precisions) sets `normalize_by = "task_count"`:  sum_k w_k L_k / K_present. Weights of 1
reproduce the data-balanced loss either way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from mtmoe.config import build_section
from mtmoe.config.registry import Registry


@dataclasses.dataclass(kw_only=True)
class NoOptions:
    """A weighter without settings."""


class TaskWeighter:
    """Base class: uniform weights and no state.

    A weighter is chosen by `balance.weighter: NAME` once it is registered (`register_weighter`), and
    its settings come from `balance.options`, checked against its `options` dataclass.

    Args:
        num_tasks: K, the number of tasks (rows of the manifest).
    """

    needs_validation = False  # True: the trainer also feeds `observe_validation` every step
    normalize_by = "weight_sum"  # or "task_count"; see `mtmoe.balance.task_loss.balanced_loss`
    options: ClassVar[type] = NoOptions  # set by `register_weighter`

    @classmethod
    def from_options(cls, task_names: list[str], options: Any) -> TaskWeighter:
        """The weighter over `task_names` (id order) with its validated options."""
        return cls(len(task_names), **dataclasses.asdict(options))

    def __init__(self, num_tasks: int, **_: Any):
        self.num_tasks = num_tasks

    def weights(self, counts_X: torch.Tensor | None = None) -> torch.Tensor:
        """The weight of every task for the coming step, float64 (K,).

        Args:
            counts_X: The coming global batch's target tokens per task (known before the forward);
                only `token_mean` uses it.
        """
        return torch.ones(self.num_tasks, dtype=torch.float64)

    def observe(self, losses_X: torch.Tensor, present_X: torch.Tensor) -> None:
        """Takes the step's global per-task losses; `present_X` marks tasks that had tokens."""

    def observe_validation(self, losses_X: torch.Tensor, present_X: torch.Tensor) -> None:
        """Takes global per-task validation losses (once before training, then after every step)."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue with the same weights."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores `state_dict`."""


WEIGHTERS: Registry[type[TaskWeighter]] = Registry("weighter", "config key 'balance.weighter'")


def register_weighter(name: str, options: type = NoOptions) -> Callable[[type], type]:
    """Class decorator: `balance.weighter: name` chooses the class, `options` is its settings' dataclass.

    Raises:
        ValueError: If the name is taken.
    """
    return WEIGHTERS.register_class(name, options)


def weighter_class(name: str) -> type[TaskWeighter]:
    """The registered weighter `name` (an unknown one is a `ValueError` naming `balance.weighter`)."""
    return WEIGHTERS.lookup(name)


def build_weighter(cfg, task_names: list[str]) -> TaskWeighter:
    """The weighter named by `balance.weighter`, over the manifest's tasks (in id order).

    Args:
        cfg: The `BalanceConfig`.
        task_names: All task names, in task-id order.

    Raises:
        ValueError: Naming the config key, for an unknown weighter or option, or an invalid value.
    """
    cls = weighter_class(cfg.weighter)
    return cls.from_options(task_names, weighter_options(cfg))


def weighter_options(cfg) -> Any:
    """`balance.options` as the chosen weighter's options dataclass (keys and types checked)."""
    return build_section(weighter_class(cfg.weighter).options, cfg.options, "balance.options.")
