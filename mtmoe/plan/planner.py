"""The plan of a run: parameters, optimizer, activations and traffic per rank, against the GPU."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from mtmoe.config import Config
from mtmoe.data.shards import load_manifest
from mtmoe.model.moe_lm import DTYPES
from mtmoe.model.walk import moe_blocks
from mtmoe.parallel.ds_config import build_ds_config
from mtmoe.plan.activations import activation_plan
from mtmoe.plan.meta import meta_model
from mtmoe.plan.probe import layer_specs
from mtmoe.plan.traffic import traffic_plan
from mtmoe.plan.workload import Workload
from mtmoe.plan.zero import (
    count_parameters,
    optimizer_memory,
    zero3_frozen_bytes,
    zero3_gathered_bytes,
    zero_groups,
)


def plan(
    cfg: Config, workload: Workload, vocab_size: int | None = None, task_names: list[str] | None = None
) -> dict[str, Any]:
    """The per-rank memory and traffic plan of a run (JSON-ready).

    Args:
        cfg: The run config.
        workload: World size, sequence length and GPU.
        vocab_size: For the tiny bases (whose vocabulary follows the tokenizer); default 49152.
        task_names: The manifest's tasks in id order (default: `workload.num_tasks` anonymous tasks).

    Raises:
        ValueError: For an `ep_size` that divides neither the experts nor the world (naming it).
    """
    task_names = task_names or [f"task{i}" for i in range(workload.num_tasks)]
    model = meta_model(cfg, vocab_size or 49152, task_names, workload.world)
    config = model.lm.config
    dtype = DTYPES[cfg.model.dtype]
    params = count_parameters(model, dtype)
    groups = zero_groups(model, cfg, workload.world)
    opt = optimizer_memory(groups, cfg, workload.world)
    acts = activation_plan(model, cfg, config, workload, task_names)
    specs = layer_specs(model)
    traffic = traffic_plan(cfg, groups, acts["assignments"], config.hidden_size, specs)

    frozen = params["frozen_dense"]["bytes"] + params["frozen_expert"]["bytes"]
    gathered = 0
    if cfg.parallel.zero_stage == 3:
        frozen = zero3_frozen_bytes(params, cfg, workload.world)
        zero = build_ds_config(cfg, workload.world)["zero_optimization"]
        gathered = zero3_gathered_bytes(model, dtype, int(zero.get("stage3_prefetch_bucket_size", 5e7)))
    n_trainable = params["trainable_dense"]["numel"] + params["trainable_expert"]["numel"]
    qr = (1 + len(task_names)) * n_trainable * 4 if cfg.balance.quality_retain else 0
    gc = cfg.model.gradient_checkpointing
    act = acts["checkpointing"]["total"] if gc else acts["no_checkpointing"]
    persistent = frozen + params["buffers"]["bytes"] + opt["trainable"] + opt["master"] + opt["adam"] + qr
    backward = act + acts["workspace"] + opt["grads"] + opt["bucket"] + gathered
    step = opt["grads"] + opt["step_grads_fp32"] + opt["step_workspace"]
    peak = persistent + max(backward, step)
    blocks = moe_blocks(model.lm)
    first = next(iter(blocks.values()), None)
    return {
        "recipe": {
            "base": cfg.model.base,
            "family": cfg.moe.family,
            "dtype": cfg.model.dtype,
            "zero_stage": cfg.parallel.zero_stage,
            "ep_size": cfg.parallel.ep_size,
            "gradient_checkpointing": gc,
            "micro_batch_size": cfg.train.micro_batch_size,
            "grad_accum": cfg.train.grad_accum,
        },
        "workload": dataclasses.asdict(workload),
        "model": {
            "architecture": type(model.lm).__name__,
            "layers": len(specs),
            "moe_layers": sum(s.moe for s in specs),
            "hidden": config.hidden_size,
            "experts": first.num_experts if first is not None else 0,
            "experts_per_rank": _local_experts(first),
            "vocab": config.vocab_size,
        },
        "parameters": params,
        "zero_groups": groups,
        "optimizer": opt,
        "quality_retain": qr,
        "activations": acts,
        "traffic": traffic,
        "memory": {
            "frozen_held": frozen,
            "zero3_gathered": gathered,
            "persistent": persistent,
            "activations": act,
            "backward_phase": backward,
            "step_phase": step,
            "peak": peak,
            "usable": workload.usable_bytes,
            "fits": peak <= workload.usable_bytes,
        },
    }


def _local_experts(block: nn.Module | None) -> int:
    if block is None:
        return 0
    experts = getattr(block, "experts", None)
    return experts.num_local if experts is not None else block.num_experts


def manifest_facts(cfg: Config) -> dict[str, Any]:
    """Vocabulary size, row length and task names from `data.tokenized`'s manifest (None where absent)."""
    path = Path(cfg.data.tokenized) / "manifest.json"
    if not path.is_file():
        return {"vocab_size": None, "max_len": None, "task_names": None}
    manifest = load_manifest(path.parent)
    return {
        "vocab_size": manifest.vocab_size,
        "max_len": manifest.max_len,
        "task_names": [t.name for t in manifest.tasks],
    }
