"""Injection: freeze a Hugging Face causal LM and replace its FFNs with MoE-LoRA blocks."""

from __future__ import annotations

from torch import nn

from mtmoe.config import MoEConfig
from mtmoe.model.block import MoELoRAFFN
from mtmoe.model.experts import UpcycledLoRAExperts
from mtmoe.model.lora import LoRALinear
from mtmoe.model.moe_base import MoEBlock, RoutingContext
from mtmoe.model.router import TopKRouter
from mtmoe.parallel.expert_parallel import ExpertPlacement, MoEMarker, mark_expert_params


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Llama/Mistral/Qwen2-style HF causal LM.

    Raises:
        ValueError: If the model has no `model.layers`.
    """
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: expected decoder layers at `model.model.layers`")
    return layers


def inject_moe_lora(
    model: nn.Module, cfg: MoEConfig, num_tasks: int, placement: ExpertPlacement | None = None
) -> RoutingContext:
    """Freezes `model` and swaps the chosen FFNs for MoE-LoRA blocks (plus optional attention LoRA).

    Args:
        model: An HF causal LM with SwiGLU FFNs (`gate_proj`, `up_proj`, `down_proj`, `act_fn`).
        cfg: The MoE section of the config.
        num_tasks: Number of tasks (rows of the utilization counters).
        placement: For training under DeepSpeed: which experts this rank holds. Expert parameters are
            then marked for DeepSpeed's expert groups and each block carries a `MoEMarker`. None builds
            every expert locally, unmarked (export, evaluation, unit tests).

    Returns:
        The routing context that every injected block shares.

    Raises:
        ValueError: For a layer index out of range or an FFN that is not SwiGLU (naming `moe.layers`).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    layers = decoder_layers(model)
    chosen = list(range(len(layers))) if cfg.layers == "all" else list(cfg.layers)
    bad = [i for i in chosen if not 0 <= i < len(layers)]
    if bad:
        raise ValueError(f"config key 'moe.layers': {bad} out of range for a model with {len(layers)} layers")
    context = RoutingContext(num_tasks=num_tasks, aux_coef=cfg.aux_loss_coef)
    for i in chosen:
        mlp = layers[i].mlp
        if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            raise ValueError(
                f"config key 'moe.layers': layer {i}'s FFN {type(mlp).__name__} is not a SwiGLU FFN"
            )
        dim, ffn_dim = mlp.gate_proj.in_features, mlp.gate_proj.out_features
        router = TopKRouter(dim, cfg.num_experts, cfg.top_k, cfg.normalize_top_k, cfg.router_init_std)
        local = placement.local if placement else None
        experts = UpcycledLoRAExperts(cfg.num_experts, dim, ffn_dim, cfg.rank, cfg.alpha, local)
        block = MoELoRAFFN(mlp, router, experts, context, placement, cfg.capacity_factor)
        if placement is not None:
            mark_expert_params(experts, placement)
            block.ds_moe_marker = MoEMarker(placement)
        layers[i].mlp = block
        if cfg.attn_lora_rank:
            attn = layers[i].self_attn
            for name in cfg.attn_targets:
                base = getattr(attn, name, None)
                if not isinstance(base, nn.Linear):
                    raise ValueError(f"config key 'moe.attn_targets': layer {i} has no linear {name!r}")
                setattr(attn, name, LoRALinear(base, cfg.attn_lora_rank, cfg.attn_lora_alpha))
    return context


def moe_blocks(model: nn.Module) -> dict[int, MoEBlock]:
    """The injected blocks (of any family) by layer index."""
    return {i: layer.mlp for i, layer in enumerate(decoder_layers(model)) if isinstance(layer.mlp, MoEBlock)}


def lora_linears(model: nn.Module) -> dict[str, LoRALinear]:
    """The attention LoRA layers by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
