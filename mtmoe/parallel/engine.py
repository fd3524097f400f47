"""The DeepSpeed engine around the MoE-LoRA model: MoE-aware optimizer groups and the LR schedule."""

from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist
from torch import nn

from mtmoe.config import Config
from mtmoe.parallel.ds_config import build_ds_config
from mtmoe.parallel.expert_parallel import ExpertPlacement, clip_grad_norm_


class SkippableAdamW(torch.optim.AdamW):
    """AdamW whose next `step()` can be turned into a no-op (moments and step count untouched)."""

    skip_next_step: bool = False

    def step(self, closure=None):
        """One AdamW step, unless `skip_next_step` is set."""
        if self.skip_next_step:
            return None
        return super().step(closure)


def param_groups(model: nn.Module, weight_decay: float, router_lr: float | None = None) -> list[dict]:
    """Optimizer groups of the trainable parameters only: experts, routers and attention LoRA.

    The groups are split into DeepSpeed's MoE groups, so that expert parameters (marked by
    `mark_expert_params`) reduce over their expert-data-parallel group. Routers get no weight decay, and
    their own learning rate when `router_lr` is given (the schedule scales it like the others).
    """
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    groups: dict[str, list[nn.Parameter]] = {"experts": [], "router": [], "attn_lora": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        kind = "router" if ".router." in name else "experts" if ".experts." in name else "attn_lora"
        groups[kind].append(p)
    raw = [
        {"name": kind, "params": params, "weight_decay": 0.0 if kind == "router" else weight_decay}
        for kind, params in groups.items()
        if params
    ]
    for group in raw:
        if group["name"] == "router" and router_lr is not None:
            group["lr"] = router_lr
    split = split_params_into_different_moe_groups_for_optimizer(raw)
    return [g for g in split if g["params"]]  # the split leaves the expert group empty; ZeRO drops it


def resident_param_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the parameters this rank keeps between steps, and of the whole model's, frozen and trainable.

    Under ZeRO-3 a rank keeps its partition of each tensor (`ds_tensor`), plus the whole tensor while it
    is gathered (DeepSpeed may keep a tensor gathered between uses); otherwise the tensor. Expert tensors
    under expert parallelism count as this rank's share of the model too.

    Returns:
        {"frozen", "trainable"}: bytes held here; {"frozen_full", "trainable_full"}: the same tensors
        whole.
    """
    out = dict.fromkeys(("frozen", "trainable", "frozen_full", "trainable_full"), 0)
    for p in model.parameters():
        kind = "trainable" if p.requires_grad else "frozen"
        size = p.element_size()
        held = p.numel() + (p.ds_tensor.numel() if hasattr(p, "ds_id") else 0)  # data is empty when released
        out[kind] += held * size
        out[f"{kind}_full"] += (p.ds_numel if hasattr(p, "ds_id") else p.numel()) * size
    return out


def param_bytes_per_rank(model: nn.Module) -> list[dict[str, int]]:
    """`resident_param_bytes` of every rank, in rank order (a collective)."""
    if not dist.is_initialized():
        return [resident_param_bytes(model)]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, resident_param_bytes(model))
    return out


def lr_lambda(cfg: Config):
    """Linear warm-up to `train.lr`, then cosine decay to `train.min_lr_ratio * train.lr`."""
    t = cfg.train

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / (t.warmup_steps + 1)
        progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_engine(model: nn.Module, cfg: Config, world_size: int, placement: ExpertPlacement | None = None):
    """Wraps `model` in a DeepSpeed engine (ZeRO stage from the config, client AdamW, cosine schedule).

    The AdamW is a `SkippableAdamW`, so that the loop can skip a step with a non-finite gradient.

    Args:
        model: The model to train.
        cfg: The run config.
        world_size: Ranks in the job.
        placement: The experts' placement (for ZeRO-0 clipping under expert parallelism).

    Returns:
        The engine.
    """
    import deepspeed

    optimizer = SkippableAdamW(
        param_groups(model, cfg.train.weight_decay, cfg.train.lr * cfg.train.router_lr_scale),
        lr=cfg.train.lr,
        betas=(0.9, 0.999),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=build_ds_config(cfg, world_size),
        dist_init_required=False,
    )
    if placement is not None and placement.ep_size > 1 and cfg.train.grad_clip > 0:
        # ZeRO-0 fp32 clips through this engine method, averaging per-rank norms: wrong when ranks hold
        # different experts. (ZeRO-1/2 and the bf16 optimizer already sum expert norms correctly.)
        engine.clip_fp32_gradients = functools.partial(clip_grad_norm_, model, cfg.train.grad_clip, placement)
    return engine
