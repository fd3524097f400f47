"""Injection: freeze a Hugging Face causal LM and replace its FFNs with MoE-LoRA blocks."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mtmoe.config import MoEConfig
from mtmoe.model.block import MoELoRAFFN
from mtmoe.model.experts import UpcycledLoRAExperts
from mtmoe.model.lora import LoRALinear
from mtmoe.model.moe_base import MoEBlock, RoutingContext
from mtmoe.model.moefied import MoEfiedFFN
from mtmoe.model.native import inject_native_moe
from mtmoe.model.routers import Router, RouterShape, check_family, router_class, router_options
from mtmoe.model.walk import decoder_layers
from mtmoe.model.zero3 import gathered
from mtmoe.parallel.expert_parallel import ExpertPlacement, MoEMarker, mark_expert_params


def task_expert_mask(cfg: MoEConfig, task_names: list[str]) -> torch.Tensor | None:
    """Which experts a token of each task may choose: the open pool plus its group's reserved experts.

    Experts are laid out as [num_experts open ones] + [task_experts per group, groups in order].

    Returns:
        allowed_XE (bool), or None when no experts are reserved.

    Raises:
        ValueError: Naming `moe.task_groups` for an unknown task or a task in no or two groups.
    """
    if not cfg.task_experts:
        return None
    groups = cfg.task_groups or {name: [name] for name in task_names}
    group_of: dict[str, int] = {}
    for g, (group, members) in enumerate(groups.items()):
        for task in members:
            if task not in task_names:
                raise ValueError(
                    f"config key 'moe.task_groups.{group}': unknown task {task!r}; known: {task_names}"
                )
            if task in group_of:
                raise ValueError(f"config key 'moe.task_groups': task {task!r} is in two groups")
            group_of[task] = g
    lost = [t for t in task_names if t not in group_of]
    if lost:
        raise ValueError(f"config key 'moe.task_groups': tasks {lost} are in no group")
    E = cfg.num_experts + cfg.task_experts * len(groups)
    allowed_XE = torch.zeros(len(task_names), E, dtype=torch.bool)
    allowed_XE[:, : cfg.num_experts] = True
    for x, task in enumerate(task_names):
        first = cfg.num_experts + group_of[task] * cfg.task_experts
        allowed_XE[x, first : first + cfg.task_experts] = True
    return allowed_XE


def inject_moe_lora(
    model: nn.Module,
    cfg: MoEConfig,
    num_tasks: int,
    placement: ExpertPlacement | None = None,
    task_names: list[str] | None = None,
) -> RoutingContext:
    """Freezes `model` and swaps the chosen FFNs for MoE-LoRA blocks (plus optional attention LoRA).

    Args:
        model: An HF causal LM with SwiGLU FFNs (`gate_proj`, `up_proj`, `down_proj`, `act_fn`).
        cfg: The MoE section of the config.
        num_tasks: Number of tasks (rows of the utilization counters and of task-routing tables).
        placement: For training under DeepSpeed: which experts this rank holds. Expert parameters are
            then marked for DeepSpeed's expert groups and each block carries a `MoEMarker`. None builds
            every expert locally, unmarked (export, evaluation, unit tests).
        task_names: Task names in id order (needed by `moe.task_experts`).

    Returns:
        The routing context that every injected block shares.

    Raises:
        ValueError: For a layer index out of range or an FFN that is not SwiGLU (naming `moe.layers`).
    """
    check_family(cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    layers = decoder_layers(model)
    chosen = list(range(len(layers))) if cfg.layers == "all" else list(cfg.layers)
    bad = [i for i in chosen if not 0 <= i < len(layers)]
    if bad:
        raise ValueError(f"config key 'moe.layers': {bad} out of range for a model with {len(layers)} layers")
    if cfg.task_experts and (task_names is None or len(task_names) != num_tasks):
        raise ValueError("config key 'moe.task_experts': the task names are needed to reserve experts")
    allowed_XE = task_expert_mask(cfg, task_names or [])
    num_experts = cfg.num_experts if allowed_XE is None else allowed_XE.shape[1]
    if placement is not None and cfg.family != "native" and num_experts != placement.num_experts:
        raise ValueError(
            f"config key 'parallel.ep_size': the blocks have {num_experts} experts with moe.task_experts, "
            f"placed as {placement.num_experts}"
        )
    router_cls, options = router_class(cfg.router), router_options(cfg)  # parsed once, used by every block
    aux_coef, z_coef = router_cls.loss_coefs(options)
    context = RoutingContext(num_tasks=num_tasks, aux_coef=aux_coef, z_coef=z_coef)
    if cfg.family == "native":
        args = (cfg.rank, cfg.alpha, context, placement, cfg.capacity_factor, options)
        replaced = inject_native_moe(model, *args)
        if cfg.layers != "all" and sorted(cfg.layers) != replaced:
            raise ValueError(
                f"config key 'moe.layers': a native model's MoE layers are {replaced}; use 'all'"
            )
        chosen = replaced
    if cfg.family == "lora":
        inject_peft_lora(model, cfg, chosen)
    for i in chosen:
        if cfg.family not in ("native", "lora"):
            routing = (router_cls, options, num_tasks, allowed_XE)
            with gathered(layers[i].mlp):  # ZeRO-3: a MoEfied block reads the FFN it slices
                layers[i].mlp = _block(layers[i].mlp, i, cfg, context, placement, *routing)
        if cfg.attn_lora_rank:
            attn = layers[i].self_attn
            for name in cfg.attn_targets:
                base = getattr(attn, name, None)
                if not isinstance(base, nn.Linear):
                    raise ValueError(f"config key 'moe.attn_targets': layer {i} has no linear {name!r}")
                setattr(attn, name, LoRALinear(base, cfg.attn_lora_rank, cfg.attn_lora_alpha))
    return context


PEFT_TARGETS = ["gate_proj", "up_proj", "down_proj"]


def inject_peft_lora(model: nn.Module, cfg: MoEConfig, layers: list[int]) -> None:
    """`moe.family: lora`: one plain PEFT LoRA on the FFN projections of `layers`, in place.

    PEFT's own layers (`peft.inject_adapter_in_model`), so that the baseline is the LoRA users would
    pick; the model stays a plain HF causal LM with LoRA-wrapped linears.
    """
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=0.0,
        target_modules=PEFT_TARGETS,
        layers_to_transform=layers,
        layers_pattern="layers",
    )
    inject_adapter_in_model(config, model)


def _block(
    mlp: nn.Module,
    i: int,
    cfg: MoEConfig,
    context: RoutingContext,
    placement: ExpertPlacement | None,
    router_cls: type[Router],
    options: Any,
    num_tasks: int,
    allowed_XE: torch.Tensor | None,
) -> MoEBlock:
    """The MoE block of the configured family (upcycled or MoEfied) that replaces dense FFN `mlp`."""
    if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        raise ValueError(f"config key 'moe.layers': layer {i}'s FFN {type(mlp).__name__} is not a SwiGLU FFN")
    dim, ffn_dim = mlp.gate_proj.in_features, mlp.gate_proj.out_features
    if cfg.family == "moefied":
        router = router_cls.from_options(options, RouterShape(dim, cfg.num_experts, cfg.top_k, num_tasks))
        if ffn_dim % cfg.num_experts:
            raise ValueError(
                f"config key 'moe.num_experts': {cfg.num_experts} does not divide FFN width {ffn_dim}"
            )
        args = (cfg.num_experts, router.top_k, cfg.rank, cfg.alpha, context)
        return MoEfiedFFN(mlp, *args, router=router, capacity_factor=cfg.capacity_factor)
    num_experts = cfg.num_experts if allowed_XE is None else allowed_XE.shape[1]
    router = router_cls.from_options(options, RouterShape(dim, num_experts, cfg.top_k, num_tasks, allowed_XE))
    local = placement.local if placement else None
    experts = UpcycledLoRAExperts(num_experts, dim, ffn_dim, cfg.rank, cfg.alpha, local)
    shared = None
    if cfg.shared_experts:
        shared = UpcycledLoRAExperts(cfg.shared_experts, dim, ffn_dim, cfg.rank, cfg.alpha)
    block = MoELoRAFFN(mlp, router, experts, context, placement, cfg.capacity_factor, shared)
    if placement is not None:
        mark_expert_params(experts, placement)
        block.ds_moe_marker = MoEMarker(placement)
    return block
