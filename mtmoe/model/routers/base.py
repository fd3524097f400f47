"""The router extension point: what a router returns, what it declares, and the registry.

A router is an `nn.Module` that maps a block's tokens to expert weights. Adding one is one new file: a
subclass of `Router` with a `from_options` constructor, registered by name with its options dataclass,

    @register_router("mine", MineOptions)
    class MineRouter(Router): ...

after which `moe.router: mine` chooses it and `moe.router_options` holds the fields of `MineOptions`
(keys and types checked, naming `moe.router_options.<key>`). The class declares what the rest of the
system needs to know about it: the expert families it can route (`families`), whether its gate depends
on the task alone (`per_task`: the block then mixes every expert per projection, needs no dispatch and
folds into an exact dense model per task), whether it has task-routing tensors (`task_aware`) and the
weights of its auxiliary losses (`loss_coefs`).

Shape legend: T tokens, D hidden size, E experts, K experts per token, X tasks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from mtmoe.config import Config, MoEConfig, build_section
from mtmoe.config.registry import Registry


@dataclass
class RouterOutput:
    """What a router decides for a batch of tokens.

    Attributes:
        weights_TK: Gate weight of each chosen expert.
        ids_TK: Chosen expert ids.
        aux_loss: Switch/Mixtral load-balance loss, E * sum_e f_e * P_e, over the valid tokens
            (equals 1 when routing is perfectly balanced); zero for routers without one.
        z_loss: ST-MoE router z-loss, the mean of logsumexp(logits)² over the valid tokens.
        scores_TK: The chosen experts' raw scores (before renormalising): what ranks an expert's
            assignments under a capacity with K >= 3, as in DeepSpeed's top-k gating.
    """

    weights_TK: torch.Tensor
    ids_TK: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor | None = None
    scores_TK: torch.Tensor | None = None


@dataclass(frozen=True)
class RouterShape:
    """What a block tells its router: sizes, and the experts each task may choose.

    Attributes:
        dim: Hidden size D.
        num_experts: E, every expert of the block (all ranks).
        top_k: K experts per token (`moe.top_k`, or the checkpoint's for a native block).
        num_tasks: X, the tasks in the manifest.
        allowed_XE: Optional bool mask of the experts a token of each task may choose (reserved experts).
    """

    dim: int
    num_experts: int
    top_k: int
    num_tasks: int = 1
    allowed_XE: torch.Tensor | None = None


@dataclass(kw_only=True)
class NoOptions:
    """A router without settings."""


class Router(nn.Module):
    """Base of every registered router.

    Attributes:
        options: The router's options dataclass (set by `register_router`).
        families: The `moe.family` values whose blocks it can route.
        per_task: True for a gate that depends on the token's task alone and mixes every expert (the
            block then folds the experts per task, with no dispatch); False for a router of tokens.
        num_experts: E.
        top_k: Experts each token uses (E for a router that mixes them all).
    """

    options: ClassVar[type] = NoOptions
    families: ClassVar[tuple[str, ...]] = ("upcycled",)
    per_task: ClassVar[bool] = False
    num_experts: int
    top_k: int

    @classmethod
    def from_options(cls, options: Any, shape: RouterShape) -> Router:
        """The router for one block of `shape`, as `options` configure it."""
        raise NotImplementedError

    @classmethod
    def task_aware(cls, options: Any) -> bool:
        """Whether the router has task-routing tensors (what `train.trainable: task_routing` trains)."""
        return False

    @classmethod
    def loss_coefs(cls, options: Any) -> tuple[float, float]:
        """The weights of the load-balance and z losses in the training loss."""
        return 0.0, 0.0

    @classmethod
    def check(cls, cfg: Config, options: Any) -> None:
        """Refuses settings of other sections that cannot work with this router (naming the key)."""


ROUTERS: Registry[type[Router]] = Registry("router", "config key 'moe.router'")


def register_router(name: str, options: type = NoOptions) -> Callable[[type], type]:
    """Class decorator: `moe.router: name` chooses the class, `options` is its settings' dataclass.

    Raises:
        ValueError: If the name is taken.
    """
    return ROUTERS.register_class(name, options)


def router_class(name: str) -> type[Router]:
    """The registered router `name` (an unknown one is a `ValueError` naming `moe.router`)."""
    return ROUTERS.lookup(name)


def router_options(cfg: MoEConfig) -> Any:
    """`moe.router_options` as the chosen router's options dataclass (keys and types checked)."""
    try:
        return build_section(router_class(cfg.router).options, cfg.router_options, "moe.router_options.")
    except ValueError as e:  # a recipe's options of one router, with another chosen by an override
        raise ValueError(f"{e} (the options of moe.router={cfg.router})") from None


def check_family(cfg: MoEConfig) -> None:
    """Refuses a router that cannot route `moe.family`'s blocks (a plain LoRA has no router to check)."""
    families = router_class(cfg.router).families
    if cfg.family != "lora" and cfg.family not in families:
        raise ValueError(
            f"config key 'moe.router': {cfg.router} routes {'|'.join(families)} blocks, "
            f"not moe.family={cfg.family}"
        )


def check_router(cfg: Config) -> None:
    """Checks the router against the family and the other sections; a bad key fails before any work.

    Raises:
        ValueError: Naming the config key.
    """
    cls, options = router_class(cfg.moe.router), router_options(cfg.moe)
    check_family(cfg.moe)
    if cls.per_task:
        for key, clash in {
            "moe.task_experts": cfg.moe.task_experts,
            "moe.fade_fraction": cfg.moe.fade_fraction,
            "parallel.ep_size": cfg.parallel.ep_size > 1,
        }.items():
            if clash:
                raise ValueError(
                    f"config key {key!r}: must be 0/1 with moe.router={cfg.moe.router} "
                    "(every token mixes every expert)"
                )
    if cfg.train.trainable == "task_routing" and not cls.task_aware(options):
        raise ValueError(
            f"config key 'train.trainable': task_routing, but moe.router={cfg.moe.router} with these "
            "moe.router_options has no task-routing tensors (task_gate, or topk with task_embedding: true)"
        )
    cls.check(cfg, options)


def build_router(cfg: MoEConfig, shape: RouterShape) -> Router:
    """The router `cfg` names, for one block of `shape`."""
    return router_class(cfg.router).from_options(router_options(cfg), shape)
