"""The model a plan counts: built on the meta device exactly as training builds it for rank 0."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtmoe.config import Config, MoEConfig
from mtmoe.model.base import SMOLLM2_ALIAS
from mtmoe.model.block import MoELoRAFFN
from mtmoe.model.experts import UpcycledLoRAExperts
from mtmoe.model.frozen_store import store_frozen_
from mtmoe.model.inject import inject_moe_lora
from mtmoe.model.moe_base import MoEBlock, RoutingContext
from mtmoe.model.moe_lm import DTYPES, TINY_MOE, MoELM, block_num_experts, build_base
from mtmoe.model.routers import RouterShape, build_router
from mtmoe.model.walk import decoder_layers
from mtmoe.parallel.expert_parallel import ExpertPlacement, check_ep_size

MODEL_CONFIGS = Path(__file__).resolve().parents[2] / "launch" / "model_configs"


def base_folder(name: str) -> Path:
    """The HF folder whose config.json describes `model.base` (the demo alias maps to a shipped config).

    Raises:
        ValueError: Naming `model.base` if there is no config.json.
    """
    path = MODEL_CONFIGS / SMOLLM2_ALIAS if name == SMOLLM2_ALIAS else Path(name)
    if not (path / "config.json").is_file():
        raise ValueError(f"config key 'model.base': {name!r} has no config.json to plan from")
    return path


def meta_base(cfg: Config, vocab_size: int) -> nn.Module:
    """The frozen base on the meta device: no weights are read and no memory is taken."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        if cfg.model.base == "tiny-llama" or cfg.model.base in TINY_MOE:
            return build_base(cfg, vocab_size)
        config = AutoConfig.from_pretrained(base_folder(cfg.model.base))
        return AutoModelForCausalLM.from_config(config, dtype=DTYPES[cfg.model.dtype])


def experts_per_block(cfg: Config, config: Any, task_names: list[str]) -> int:
    """E of every MoE block: the checkpoint's for native models, else the recipe's (with reserved ones)."""
    if cfg.moe.family == "native":
        return int(getattr(config, "num_local_experts", None) or config.num_experts)
    return block_num_experts(cfg, task_names)


class MoEfiedShapes(MoEBlock):
    """Stands in for `MoEfiedFFN` where it cannot be built (the meta device: k-means needs real weights).

    It holds the same parameters and buffers under the same names, shapes, dtypes and trainability, and
    computes nothing.

    Args:
        mlp: The dense SwiGLU FFN it replaces.
        cfg: The MoE section of the config.
        context: The model's routing context.
        num_tasks: Tasks (for the router's task embeddings).
    """

    def __init__(self, mlp: nn.Module, cfg: MoEConfig, context: RoutingContext, num_tasks: int):
        E = cfg.num_experts
        super().__init__(E, context)
        D, F = mlp.gate_proj.in_features, mlp.gate_proj.out_features
        if F % E:
            raise ValueError(f"config key 'moe.num_experts': {E} does not divide FFN width {F}")
        f, dt = F // E, mlp.gate_proj.weight.dtype
        self.register_buffer("perm_F", torch.empty(F, dtype=torch.long))
        for name, shape in (("gate_EDf", (E, D, f)), ("up_EDf", (E, D, f)), ("down_EfD", (E, f, D))):
            setattr(self, name, nn.Parameter(torch.empty(shape, dtype=dt), requires_grad=False))
        self.experts = UpcycledLoRAExperts(E, D, f, cfg.rank, cfg.alpha)
        self.router = build_router(cfg, RouterShape(D, E, cfg.top_k, num_tasks))

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:  # pragma: no cover - never called
        """Refuses: a stand-in for counting only."""
        raise RuntimeError("MoEfiedShapes only describes a MoEfied block's tensors")


def meta_model(cfg: Config, vocab_size: int, task_names: list[str], world: int = 1) -> MoELM:
    """The model that training builds on rank 0, on the meta device.

    Raises:
        ValueError: Naming `parallel.ep_size` if it divides neither the experts nor the world.
    """
    lm = meta_base(cfg, vocab_size)
    E = experts_per_block(cfg, lm.config, task_names)
    check_ep_size(cfg.parallel.ep_size, E, world)
    placement = ExpertPlacement(E, cfg.parallel.ep_size, 0)
    moe = cfg.moe  # a MoEfied block is injected as an upcycled one, then swapped for its shapes
    if cfg.moe.family == "moefied":
        moe = dataclasses.replace(cfg.moe, family="upcycled", router="topk", router_options={})
    # Reserved experts: TopKRouter checks its (task, expert) mask with .item(), which meta tensors refuse,
    # so the new LoRA and router tensors are then made on the CPU (the frozen base stays on meta).
    where = torch.device("cpu" if cfg.moe.task_experts else "meta")
    with where:
        context = inject_moe_lora(lm, moe, len(task_names), placement, task_names)
        if cfg.moe.family == "moefied":
            for layer in decoder_layers(lm):
                if isinstance(layer.mlp, MoELoRAFFN):
                    layer.mlp = MoEfiedShapes(layer.mlp.base, cfg.moe, context, len(task_names))
    if cfg.model.frozen_dtype:
        store_frozen_(lm, DTYPES[cfg.model.frozen_dtype], DTYPES[cfg.model.dtype])
    return MoELM(lm, context)
