"""Checking a plan against a real model's allocations (tests/test_plan.py)."""

from __future__ import annotations

import dataclasses
import resource
from typing import Any

import torch

from mtmoe.config import Config
from mtmoe.model.moe_lm import DTYPES, block_num_experts, build_model
from mtmoe.model.walk import decoder_layers
from mtmoe.parallel.expert_parallel import ExpertPlacement
from mtmoe.plan.planner import plan
from mtmoe.plan.probe import cast_params_, saved_bytes
from mtmoe.plan.workload import Workload


def measure(
    cfg: Config,
    seq_len: int,
    vocab_size: int,
    task_names: list[str],
    padded: bool = True,
    placement: ExpertPlacement | None = None,
) -> dict[str, Any]:
    """Measures one real training step of the model in this process (CPU), for checking a plan.

    Builds the real model (its weights: the cached demo model, or a tiny random one), casts it as
    DeepSpeed would, and runs one micro-batch of `train.micro_batch_size` × `seq_len` random tokens
    (every position a target, the last token padding when `padded`) forward, backward and through a
    `torch.optim.AdamW` step (on fp32 masters under bf16, as DeepSpeed).

    Args:
        cfg: The run config.
        seq_len: S.
        vocab_size: For the tiny bases.
        task_names: The tasks.
        padded: Whether the micro-batch holds a padding token.
        placement: This rank's experts (default: all; an expert-parallel one needs its process group).

    Returns:
        Bytes of: parameters (frozen, trainable), gradients after backward, AdamW state after the step,
        the saved activations (total, per layer, outside the layers; with gradient checkpointing: what
        the forward stores plus the largest layer's recomputed set), and the growth of the peak RSS.
    """
    torch.manual_seed(cfg.train.seed)
    dtype = DTYPES[cfg.model.dtype]
    placement = placement or ExpertPlacement(block_num_experts(cfg, task_names))
    model = build_model(cfg, vocab_size, len(task_names), placement, task_names)
    if dtype != torch.float32:  # DeepSpeed casts under bf16 only; an fp32 run keeps a narrower frozen base
        cast_params_(model, dtype)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    out: dict[str, Any] = {
        "frozen": sum(p.numel() * p.element_size() for p in frozen),
        "trainable": sum(p.numel() * p.element_size() for p in trainable),
    }
    B = cfg.train.micro_batch_size
    gen = torch.Generator().manual_seed(0)
    ids_BS = torch.randint(0, vocab_size, (B, seq_len), generator=gen)
    mask_BS = torch.ones(B, seq_len, dtype=torch.long)
    if padded:
        mask_BS[-1, -1] = 0
    task_B = torch.zeros(B, dtype=torch.long)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    layers = decoder_layers(model.lm)
    where = {"layer": "head"}
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda m, a, i=i: where.update(layer=i))
        layer.register_forward_hook(lambda m, a, o: where.update(layer="head"))

    def forward():
        return model(ids_BS, mask_BS, mask_BS, task_B)

    gc = cfg.model.gradient_checkpointing
    if gc:  # the per-layer sets without checkpointing: what each layer's recomputation saves
        model.lm.gradient_checkpointing_disable()
        _, _, by_layer = saved_bytes(forward, params, lambda: where["layer"])
        model.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    (loss_BS, aux), total, tagged = saved_bytes(forward, params, lambda: where["layer"])
    if not gc:
        by_layer = tagged
    per_layer = [by_layer.get(i, 0) for i in range(len(layers))]
    out["activations"] = total + (max(per_layer) if gc else 0)
    out["activations_stored"] = total
    out["activations_per_layer"] = per_layer
    out["activations_head"] = by_layer.get("head", 0)
    if gc:  # MoELM.forward clears the routing context, which the recomputed forward still reads
        model.context.valid_T = mask_BS.reshape(-1).bool()
        model.context.task_T = task_B[:, None].expand_as(ids_BS).reshape(-1)
    loss = loss_BS.sum() / max(1, int((loss_BS != 0).sum())) + aux
    loss.backward()
    out["grads"] = sum(p.grad.numel() * p.grad.element_size() for p in trainable if p.grad is not None)
    masters = trainable
    if dtype != torch.float32:  # as DeepSpeed: the step updates fp32 masters of the bf16 parameters
        masters = [p.detach().float().requires_grad_() for p in trainable]
        for m, p in zip(masters, trainable, strict=True):
            m.grad = None if p.grad is None else p.grad.float()
    opt = torch.optim.AdamW(masters, lr=1e-4)
    opt.step()
    out["optimizer"] = sum(
        t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t)
    ) + (0 if masters is trainable else sum(m.numel() * 4 for m in masters))
    out["rss_growth"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
    out["total"] = out["frozen"] + out["trainable"] + out["grads"] + out["optimizer"] + out["activations"]
    return out


def check_here(
    cfg: Config, workload: Workload, vocab_size: int | None = None, task_names: list[str] | None = None
) -> dict[str, dict[str, float]]:
    """Plans `cfg` at world 1 with ZeRO-0 and measures one real step of it in this process.

    Returns:
        {"planned": `comparable(...)`, "measured": `measure(...)`}, in bytes.
    """
    task_names = task_names or [f"task{i}" for i in range(workload.num_tasks)]
    one = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, zero_stage=0))
    planned = comparable(plan(one, dataclasses.replace(workload, world=1), vocab_size, task_names))
    measured = measure(one, workload.seq_len, vocab_size or 49152, task_names, workload.padded)
    return {"planned": planned, "measured": measured}


def comparable(p: dict[str, Any]) -> dict[str, float]:
    """The planned counterparts of `measure`'s numbers (plan it at world 1 with ZeRO-0)."""
    params, opt = p["parameters"], p["optimizer"]
    acts = p["activations"]
    gc = p["recipe"]["gradient_checkpointing"]
    out = {
        "frozen": params["frozen_dense"]["bytes"] + params["frozen_expert"]["bytes"],
        "trainable": opt["trainable"],
        "grads": opt["grads"],
        "optimizer": opt["adam"] + opt["master"],
        "activations": acts["checkpointing"]["total"] if gc else acts["no_checkpointing"],
    }
    out["total"] = sum(out.values())
    return out
