"""The DeepSpeed JSON, derived from the run config (one source of truth for batch sizes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mtmoe.config import Config

# Keys the recipe owns. Setting them in a base JSON would create a second source of truth.
OWNED_KEYS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "optimizer",
    "scheduler",
    "bf16",
    "fp16",
)


# DeepSpeed ZeRO-3 options that mtmoe's model cannot take, with the reason.
ZERO3_REFUSED = {
    "zero_quantized_weights": "the MoE blocks and the fused loss read the gathered weights as they are",
    "zero_quantized_nontrainable_weights": "the frozen base is loaded into its partitions as stored",
    "offload_param": "(device nvme) the base is loaded into partitions in memory, tensor by tensor",
}


def build_ds_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """Fills the base JSON at `parallel.ds_config` with batch sizes, ZeRO stage, clipping and precision.

    The optimizer is a client `torch.optim.AdamW` (DeepSpeed's own JIT-compiles fused_adam on CPU).

    Raises:
        ValueError: If the base JSON is missing or sets a key the recipe owns (naming it).
    """
    path = Path(cfg.parallel.ds_config or f"ds_configs/zero{cfg.parallel.zero_stage}.json")
    if not path.exists():
        raise ValueError(f"config key 'parallel.ds_config': {path} does not exist")
    base = json.loads(path.read_text())
    clash = [k for k in OWNED_KEYS if k in base]
    if clash:
        raise ValueError(f"{path}: {clash[0]!r} is derived from the recipe (train.*, model.dtype); remove it")
    t = cfg.train
    ds = dict(base)
    ds["train_micro_batch_size_per_gpu"] = t.micro_batch_size
    ds["gradient_accumulation_steps"] = t.grad_accum
    ds["train_batch_size"] = t.micro_batch_size * t.grad_accum * world_size
    ds["gradient_clipping"] = t.grad_clip
    ds["bf16"] = {"enabled": cfg.model.dtype == "bfloat16"}
    zero = dict(ds.get("zero_optimization", {}))
    if zero.get("stage", cfg.parallel.zero_stage) != cfg.parallel.zero_stage:
        raise ValueError(
            f"{path}: zero_optimization.stage={zero['stage']} contradicts config key "
            f"'parallel.zero_stage'={cfg.parallel.zero_stage}"
        )
    zero["stage"] = cfg.parallel.zero_stage
    if cfg.parallel.zero_stage == 2:
        # DeepSpeed's MoE support under ZeRO-2 needs both.
        zero.setdefault("contiguous_gradients", True)
        zero.setdefault("reduce_scatter", True)
    if cfg.parallel.zero_stage == 3:
        for key, why in ZERO3_REFUSED.items():
            value = zero.get(key)
            refused = (value or {}).get("device") == "nvme" if key == "offload_param" else bool(value)
            if refused:
                raise ValueError(f"{path}: zero_optimization.{key} cannot be used with mtmoe's ZeRO-3: {why}")
        # Every tensor partitioned, however small (DeepSpeed keeps tensors under 1e5 elements whole by
        # default, which is most of a LoRA model); a tensor released as soon as its module is done
        # (DeepSpeed keeps tensors that return within 1e9 elements gathered by default: all of a small
        # model, 2 GB of a large one); and `F.linear` left alone: its memory-efficient replacement is
        # patched in process-wide and changes the numerics of other models.
        zero.setdefault("stage3_param_persistence_threshold", 0)
        zero.setdefault("stage3_model_persistence_threshold", 0)
        zero.setdefault("stage3_max_reuse_distance", 0)
        zero.setdefault("memory_efficient_linear", False)
    ds["zero_optimization"] = zero
    ds["zero_allow_untested_optimizer"] = True
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds
