"""Parameters per rank and the memory of DeepSpeed ZeRO's optimizer partitions."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from mtmoe.config import Config
from mtmoe.model.moe_base import MoEBlock
from mtmoe.parallel.ds_config import build_ds_config
from mtmoe.parallel.engine import param_groups
from mtmoe.parallel.expert_parallel import is_expert_param

DS_REDUCE_BUCKET = 500_000_000  # DeepSpeed's default zero_optimization.reduce_bucket_size (elements)


def count_parameters(model: nn.Module, dtype: torch.dtype) -> dict[str, dict[str, int]]:
    """Elements and bytes of this rank's parameters, frozen/trainable × dense/expert, and of its buffers.

    Floating parameters count in `dtype` (DeepSpeed casts every parameter to bf16 under bf16), or in
    their own dtype where that is narrower (a frozen base stored in bf16 under fp32, `model.frozen_dtype`).
    """
    out = {f"{a}_{b}": {"numel": 0, "bytes": 0} for a in ("frozen", "trainable") for b in ("dense", "expert")}
    size = torch.empty((), dtype=dtype, device="meta").element_size()
    for p in model.parameters():
        key = f"{'trainable' if p.requires_grad else 'frozen'}_{'expert' if is_expert_param(p) else 'dense'}"
        out[key]["numel"] += p.numel()
        stored = min(size, p.element_size()) if p.is_floating_point() else p.element_size()
        out[key]["bytes"] += p.numel() * stored
    buffers = {"numel": 0, "bytes": 0}
    for t in model.buffers():
        buffers["numel"] += t.numel()
        buffers["bytes"] += t.numel() * t.element_size()
    out["buffers"] = buffers
    return out


def zero_groups(model: nn.Module, cfg: Config, world: int) -> list[dict[str, Any]]:
    """The optimizer's groups as DeepSpeed partitions them on this rank.

    Returns:
        Per group: name, `expert`, numel, `partitions` (P), `aligned` (numel padded to 2·P) and
        `partition` (aligned / P, this rank's share).
    """
    groups = []
    for g in param_groups(model, cfg.train.weight_decay):
        expert = bool(g.get("moe"))
        P = world // cfg.parallel.ep_size if expert else world
        numel = sum(p.numel() for p in g["params"])
        aligned = math.ceil(numel / (2 * P)) * 2 * P
        groups.append(
            {
                "name": g["name"],
                "expert": expert,
                "numel": numel,
                "partitions": P,
                "aligned": aligned,
                "partition": aligned // P,
            }
        )
    return groups


def optimizer_memory(groups: list[dict[str, Any]], cfg: Config, world: int) -> dict[str, float]:
    """Bytes of the trainable tensors' copies that the ZeRO stage keeps, and its transient buffers.

    Returns:
        trainable (model-dtype params, flat and padded under ZeRO-1/2, this rank's partition under
        ZeRO-3), master (fp32), adam (two fp32 moments), grads (model dtype, held through backward),
        bucket (ZeRO's contiguous reduce bucket in backward), step_grads_fp32 (the fp32 gradient the
        step reads) and step_workspace (AdamW's foreach temporaries).
    """
    stage, b = cfg.parallel.zero_stage, 2 if cfg.model.dtype == "bfloat16" else 4
    n = sum(g["numel"] for g in groups)
    part = sum(g["partition"] for g in groups) if stage else n
    zero = build_ds_config(cfg, world)["zero_optimization"]
    buckets = 2 if zero.get("overlap_comm", False) else 1
    bucket = int(zero.get("reduce_bucket_size", DS_REDUCE_BUCKET)) * b * buckets
    whole = sum(g["aligned"] for g in groups) if stage else n
    return {
        "trainable": (part if stage == 3 else whole) * b,
        "master": part * 4 if stage or b != 4 else 0,
        "adam": 2 * part * 4,
        "grads": (part if stage >= 2 else n) * b,
        "bucket": bucket if stage and zero.get("contiguous_gradients", True) else 0,
        "step_grads_fp32": part * 4 if b != 4 else 0,
        "step_workspace": part * 4,
    }


def zero3_frozen_bytes(params: dict[str, dict[str, int]], cfg: Config, world: int) -> int:
    """Bytes of the frozen base a rank keeps between uses under ZeRO-3.

    Dense tensors are partitioned over the data-parallel world; expert tensors over the
    expert-data-parallel group (world / ep_size), since expert parallelism already shards them.
    """
    edp = world // cfg.parallel.ep_size
    return math.ceil(params["frozen_dense"]["bytes"] / world) + math.ceil(
        params["frozen_expert"]["bytes"] / edp
    )


def zero3_gathered_bytes(model: nn.Module, dtype: torch.dtype, prefetch_numel: int = 0) -> int:
    """The largest set of parameters a rank holds whole at once during a ZeRO-3 forward or backward.

    The LM head (an external parameter of the wrapper, whole for the whole forward) plus the larger of:
    an MoE block (a ZeRO-3 leaf, gathered with all it holds: the frozen FFN or this rank's experts, the
    LoRA experts and the router) and any other module's own parameters (one projection); plus what
    DeepSpeed prefetches for the next modules (`stage3_prefetch_bucket_size` elements).
    """
    size = torch.empty((), dtype=dtype, device="meta").element_size()

    def nbytes(params) -> int:
        return sum(p.numel() * min(size, p.element_size()) for p in params)

    head = model.lm.get_output_embeddings().weight
    largest, inside = 0, set()
    for m in model.modules():
        if isinstance(m, MoEBlock):
            largest = max(largest, nbytes(m.parameters()))
            inside.update(id(x) for x in m.modules())
    for m in model.modules():
        if id(m) not in inside:
            own = [p for p in m.parameters(recurse=False) if p is not head]
            largest = max(largest, nbytes(own))
    total = sum(p.numel() for p in model.parameters())
    return nbytes([head]) + largest + min(prefetch_numel, total) * size
