"""Checkpoints in one consolidated, shape-independent layout, written atomically.

A checkpoint holds every trainable tensor (LoRA factors, routers) and its AdamW moments in fp32, with
each block's experts in their global order, whatever the world size, ZeRO stage or `ep_size` that wrote
it. Frozen base weights are not written: they come from the base model. So a run saved on 4 ranks with
`ep_size` 2 resumes on 1 rank, or on 4 with `ep_size` 4, with its weights and its optimizer state:
each rank takes its own experts, and ZeRO its own partition, when loading.

    checkpoints/step_000040/trainable.safetensors   weights, by parameter name
    checkpoints/step_000040/optimizer.safetensors   exp_avg/<name>, exp_avg_sq/<name>
    checkpoints/step_000040/state.json              step, learning-rate position, loop, weighter, data
    checkpoints/latest                              the newest complete tag

A save goes to a temporary folder that is renamed when complete; `latest` moves last. Loading uses
safetensors and JSON only: nothing is unpickled.

DeepSpeed's own checkpoint cannot do this: its expert files assume its `MoE` module layout, and its
optimizer files need the same data-parallel size (see the README's known limits).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from mtmoe.parallel.engine import lr_lambda
from mtmoe.parallel.expert_parallel import ExpertPlacement, is_expert_param

MOMENTS = ("exp_avg", "exp_avg_sq")


def checkpoint_dir(run_dir: Path) -> Path:
    """Where a run keeps its checkpoints."""
    return run_dir / "checkpoints"


def latest_tag(run_dir: Path) -> str | None:
    """The tag of the newest complete checkpoint, or None."""
    latest = checkpoint_dir(run_dir) / "latest"
    return latest.read_text().strip() if latest.exists() else None


def _inner_optimizer(engine) -> torch.optim.Optimizer:
    """The torch AdamW under DeepSpeed's wrapper (ZeRO-1/2 and bf16 wrap it; ZeRO-0 fp32 does not)."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _zero_managed(p: torch.Tensor) -> bool:
    """True when DeepSpeed keeps this parameter's fp32 master and optimizer state in flat partitions."""
    return hasattr(p, "_hp_mapping")


def _link_optimizer_state(engine) -> None:
    """(Re)links ZeRO's per-parameter views of the AdamW state.

    DeepSpeed links them once, right after stepping its first param group, when the other groups
    (routers, experts) have no state yet; relinking after every group has state fixes their views.
    """
    opt = engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _to_global(t: torch.Tensor, p: nn.Parameter, placement: ExpertPlacement) -> torch.Tensor:
    """Gathers an expert tensor's slices from the expert-parallel group into global expert order."""
    if placement.ep_size == 1 or not is_expert_param(p):
        return t
    parts = [torch.empty_like(t) for _ in range(placement.ep_size)]
    dist.all_gather(parts, t.contiguous(), group=placement.group)
    return torch.cat(parts)


def _to_local(t: torch.Tensor, p: nn.Parameter, placement: ExpertPlacement) -> torch.Tensor:
    """This rank's slice of a global expert tensor (other tensors unchanged)."""
    return t[placement.local] if is_expert_param(p) and placement.ep_size > 1 else t


def gather_state(engine, model: nn.Module, placement: ExpertPlacement) -> tuple[dict, dict]:
    """The consolidated fp32 weights and AdamW moments of every trainable tensor (a collective).

    Returns:
        ({name: weight}, {"exp_avg/name": ..., "exp_avg_sq/name": ...}), on CPU, experts global.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    inner = _inner_optimizer(engine)
    _link_optimizer_state(engine)
    weights, moments = {}, {}
    for name, p in _trainable(model):
        if _zero_managed(p):
            w = safe_get_full_fp32_param(p)
            m = {k: safe_get_full_optimizer_state(p, k) for k in MOMENTS}
        else:
            w = p.detach().float()
            m = {k: inner.state[p][k].float() for k in MOMENTS}
        weights[name] = _to_global(w, p, placement).cpu()
        for k in MOMENTS:
            moments[f"{k}/{name}"] = _to_global(m[k], p, placement).cpu()
    return weights, moments


def save(
    engine,
    model: nn.Module,
    placement: ExpertPlacement,
    run_dir: Path,
    step: int,
    state: dict[str, Any],
    is_main: bool,
) -> Path:
    """Writes checkpoint `step_<n>` (every rank calls this; rank 0 writes) and points `latest` at it.

    Args:
        engine: The DeepSpeed engine.
        model: The trained module.
        placement: The experts' placement.
        run_dir: The run directory.
        step: Optimizer steps done.
        state: JSON-able loop state (weighter, counters, data positions).
        is_main: True on the writing rank.

    Returns:
        The checkpoint folder.
    """
    weights, moments = gather_state(engine, model, placement)
    root = checkpoint_dir(run_dir)
    tag = f"step_{step:06d}"
    final = root / tag
    if is_main:
        partial = root / f".{tag}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in weights.items()}, partial / "trainable.safetensors")
        save_file({k: v.contiguous() for k, v in moments.items()}, partial / "optimizer.safetensors")
        meta = {
            "step": step,
            "world_size": dist.get_world_size(),
            "ep_size": placement.ep_size,
            "train_batch_size": engine.train_batch_size(),
            **state,
        }
        (partial / "state.json").write_text(json.dumps(meta))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        pointer = root / ".latest.partial"
        pointer.write_text(tag)
        os.replace(pointer, root / "latest")
    dist.barrier()
    return final


def read(run_dir: Path, tag: str | None = None) -> tuple[dict, dict, dict]:
    """Reads a checkpoint's (weights, moments, state) without unpickling anything.

    Raises:
        ValueError: If the run has no checkpoint.
    """
    tag = tag or latest_tag(run_dir)
    if tag is None:
        raise ValueError(f"--resume: no checkpoint under {checkpoint_dir(run_dir)}")
    folder = checkpoint_dir(run_dir) / tag
    return (
        load_file(folder / "trainable.safetensors"),
        load_file(folder / "optimizer.safetensors"),
        json.loads((folder / "state.json").read_text()),
    )


def _prime_optimizer_state(inner: torch.optim.Optimizer, step: int) -> None:
    """Gives every AdamW tensor a state at `step` (AdamW creates it lazily on the first step)."""
    for group in inner.param_groups:
        for p in group["params"]:
            st = inner.state[p]
            if not st:
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["step"] = torch.tensor(float(step))


def load(engine, model: nn.Module, placement: ExpertPlacement, run_dir: Path, cfg) -> dict[str, Any]:
    """Loads the newest checkpoint into `engine` on any world size, ZeRO stage and `ep_size`.

    Weights, AdamW moments and step, and the learning-rate schedule position are restored; each rank
    keeps its own experts.

    Returns:
        The checkpoint's state (step, loop state, data positions).

    Raises:
        ValueError: If there is no checkpoint, or it does not match the model (naming the tensor).
    """
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    weights, moments, state = read(run_dir)
    step = int(state["step"])
    own = _trainable(model)
    missing = [n for n, _ in own if n not in weights]
    unexpected = sorted(set(weights) - {n for n, _ in own})
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {latest_tag(run_dir)} does not match the model: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    inner = _inner_optimizer(engine)
    _prime_optimizer_state(inner, step)
    _link_optimizer_state(engine)
    for name, p in own:
        w = _to_local(weights[name], p, placement)
        if tuple(w.shape) != tuple(p.shape):
            raise ValueError(f"checkpoint tensor {name}: shape {tuple(w.shape)}, model has {tuple(p.shape)}")
        with torch.no_grad():
            p.copy_(w.to(p.dtype))
        if _zero_managed(p):
            safe_set_full_fp32_param(p, w.to(p.device))
        for k in MOMENTS:
            m = _to_local(moments[f"{k}/{name}"], p, placement).to(p.device)
            if _zero_managed(p):
                safe_set_full_optimizer_state(p, m, k)
            else:
                inner.state[p][k].copy_(m)
    _restore_schedule(engine, cfg, step)
    return state


def _restore_schedule(engine, cfg, step: int) -> None:
    """Puts the LR schedule and the engine's counters where `step` optimizer steps leave them."""
    factor = lr_lambda(cfg)(step)
    scheduler = engine.lr_scheduler
    for group in _inner_optimizer(engine).param_groups:
        group["lr"] = group["initial_lr"] * factor
    scheduler.last_epoch = step
    scheduler._last_lr = [g["lr"] for g in _inner_optimizer(engine).param_groups]
    engine.global_steps = step
    engine.global_samples = step * engine.train_batch_size()
    engine.micro_steps = step * engine.gradient_accumulation_steps()
