"""Checkpoints in one consolidated, shape-independent layout, written atomically.

A checkpoint holds every trainable tensor (LoRA factors, routers) and its AdamW moments in fp32, with
each block's experts in their global order, whatever the world size, ZeRO stage or `ep_size` that wrote
it. Frozen base weights are not written: they come from the base model. So a run saved on 4 ranks with
`ep_size` 2 resumes on 1 rank, or on 4 with `ep_size` 4, with its weights and its optimizer state:
each rank takes its own experts, and ZeRO its own partition, when loading.

    checkpoints/step_000040/trainable.safetensors   weights, by parameter name
    checkpoints/step_000040/optimizer.safetensors   exp_avg/<name>, exp_avg_sq/<name>
    checkpoints/step_000040/rng.safetensors         every rank's torch (and CUDA) RNG state
    checkpoints/step_000040/quality.safetensors     Quality Retaining's EMA and teachers (when on)
    checkpoints/step_000040/state.json              step, optimizer and LR positions, loop, weighter,
                                                    data, numpy/python RNG, config
    checkpoints/latest                              the newest complete tag

A save goes to a temporary folder that is renamed when complete; `latest` moves last, and only then are
checkpoints beyond `train.keep_checkpoints` deleted. A kill at any moment leaves `latest` pointing at a
complete checkpoint. Loading uses safetensors and JSON only: nothing is unpickled.

DeepSpeed's own checkpoint cannot do this: its expert files assume its `MoE` module layout, and its
optimizer files need the same data-parallel size (see the README's known limits).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from mtmoe.parallel.engine import lr_lambda
from mtmoe.parallel.expert_parallel import ExpertPlacement, is_expert_param
from mtmoe.train import faults
from mtmoe.train.zero3_state import full_shape, is_zero3, partition_of, unpartition, write_partitions

MOMENTS = ("exp_avg", "exp_avg_sq")


def checkpoint_dir(run_dir: Path) -> Path:
    """Where a run keeps its checkpoints."""
    return run_dir / "checkpoints"


def latest_path(run_dir: Path) -> Path | None:
    """The folder of the newest complete checkpoint, or None."""
    tag = latest_tag(run_dir)
    return None if tag is None else checkpoint_dir(run_dir) / tag


def latest_tag(run_dir: Path) -> str | None:
    """The tag of the newest complete checkpoint, or None."""
    latest = checkpoint_dir(run_dir) / "latest"
    return latest.read_text().strip() if latest.exists() else None


def inner_optimizer(engine) -> torch.optim.Optimizer:
    """The torch AdamW under DeepSpeed's wrapper (ZeRO-1/2 and bf16 wrap it; ZeRO-0 fp32 does not)."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _zero_managed(p: torch.Tensor) -> bool:
    """True when DeepSpeed keeps this parameter's fp32 master and optimizer state in flat partitions."""
    return hasattr(p, "_hp_mapping") or is_zero3(p)


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


def router_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """State that training changes outside the optimizer: the routers' balancing biases.

    They are buffers, equal on every rank (each rank applies the same all-reduced update), and go into
    the checkpoint with the trainable tensors.
    """
    return {n: b for n, b in model.named_buffers() if n.endswith(".bias_E")}


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

    inner = inner_optimizer(engine)
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
    weights.update({n: b.detach().float().cpu().clone() for n, b in router_state(model).items()})
    return weights, moments


def _rng_state() -> dict[str, Any]:
    """This rank's RNG states: torch (and CUDA) as tensors, numpy's and Python's as plain data."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_rest": [np_state[2], np_state[3], np_state[4]],
        "python": torch.tensor(py_state[1], dtype=torch.int64),
        "python_rest": [py_state[0], py_state[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(tensors: dict[str, torch.Tensor], rest: dict[str, Any], rank: int) -> None:
    torch.set_rng_state(tensors[f"torch/{rank}"])
    if torch.cuda.is_available() and f"cuda/{rank}" in tensors:
        torch.cuda.set_rng_state(tensors[f"cuda/{rank}"])
    pos, has_gauss, gauss = rest["numpy_rest"][rank]
    np.random.set_state(
        ("MT19937", tensors[f"numpy/{rank}"].numpy().astype(np.uint32), pos, has_gauss, gauss)
    )
    version, py_gauss = rest["python_rest"][rank]
    random.setstate((version, tuple(tensors[f"python/{rank}"].tolist()), py_gauss))


def save(
    engine,
    model: nn.Module,
    placement: ExpertPlacement,
    run_dir: Path,
    step: int,
    state: dict[str, Any],
    is_main: bool,
    keep: int = 0,
    retainer=None,
) -> Path:
    """Writes checkpoint `step_<n>` (every rank calls this; rank 0 writes) and points `latest` at it.

    Args:
        engine: The DeepSpeed engine.
        model: The trained module.
        placement: The experts' placement.
        run_dir: The run directory.
        step: Optimizer steps done.
        state: JSON-able loop state (weighter, counters, data positions, config).
        is_main: True on the writing rank.
        keep: Keep only the newest `keep` checkpoints (0 = all).
        retainer: Quality Retaining's state, if on (its EMA and teachers go to `quality.safetensors`).

    Returns:
        The checkpoint folder.
    """
    weights, moments = gather_state(engine, model, placement)
    quality = None
    if retainer is not None:
        quality = {}
        for k, t in retainer.tensors().items():
            p = retainer.params[_param_name(k)]
            quality[k] = _to_global(unpartition(t, p), p, placement).cpu()
    rngs: list[dict | None] = [None] * dist.get_world_size()
    dist.all_gather_object(rngs, _rng_state())  # in memory between ranks; the files hold no pickle
    root = checkpoint_dir(run_dir)
    tag = f"step_{step:06d}"
    final = root / tag
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".*.partial"):  # left by a save that was killed
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink()
        partial = root / f".{tag}.partial"
        partial.mkdir()
        save_file({k: v.contiguous() for k, v in weights.items()}, partial / "trainable.safetensors")
        save_file({k: v.contiguous() for k, v in moments.items()}, partial / "optimizer.safetensors")
        rng_tensors = {f"{k}/{r}": v for r, st in enumerate(rngs) for k, v in st.items() if "_rest" not in k}
        save_file(rng_tensors, partial / "rng.safetensors")
        if quality is not None:
            save_file({k: v.contiguous() for k, v in quality.items()}, partial / "quality.safetensors")
        meta = {
            "step": step,
            "world_size": dist.get_world_size(),
            "ep_size": placement.ep_size,
            "train_batch_size": engine.train_batch_size(),
            "optimizer_steps": _adam_steps(engine),
            "scheduler_last_epoch": engine.lr_scheduler.last_epoch,
            "rng": {k: [st[k] for st in rngs] for k in ("numpy_rest", "python_rest")},
            **state,
        }
        (partial / "state.json").write_text(json.dumps(meta))
        faults.pause_in_save(step)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        pointer = root / ".latest.partial"
        pointer.write_text(tag)
        os.replace(pointer, root / "latest")
        if keep:
            for old in sorted(root.glob("step_*"))[:-keep]:
                shutil.rmtree(old)
    dist.barrier()
    return final


def _param_name(key: str) -> str:
    """The parameter a Quality Retaining tensor belongs to: `ema/<name>` or `teacher/<k>/<name>`."""
    return key.split("/", 1)[1] if key.startswith("ema/") else key.split("/", 2)[2]


def load_quality(run_dir: Path, retainer, placement: ExpertPlacement, state: dict[str, Any]) -> None:
    """Restores Quality Retaining's EMA and teachers (this rank's experts) from the newest checkpoint.

    Raises:
        ValueError: If the checkpoint was written without Quality Retaining.
    """
    folder = latest_path(run_dir)
    if state.get("quality") is None or not (folder / "quality.safetensors").exists():
        raise ValueError(f"balance.quality_retain is on, but {folder} was saved without it")
    tensors = {}
    for k, t in load_file(folder / "quality.safetensors").items():
        p = retainer.params[_param_name(k)]
        local = _to_local(t, p, placement)
        tensors[k] = partition_of(local, p) if is_zero3(p) else local
    retainer.load_state(state["quality"], tensors)


def _adam_steps(engine) -> int:
    """AdamW's step count (it lags the loop's step by the steps skipped for non-finite gradients)."""
    states = [st for st in inner_optimizer(engine).state.values() if "step" in st]
    return int(states[0]["step"]) if states else 0


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


def _prime_optimizer_state(engine, step: int) -> None:
    """Gives every AdamW tensor a state at `step` (AdamW creates it lazily on the first step).

    Under ZeRO-3 the AdamW's tensors are DeepSpeed's flat fp32 partitions, which it puts into the
    param groups only while it steps.
    """
    inner = inner_optimizer(engine)
    flats = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    tensors = flats if flats is not None else [p for g in inner.param_groups for p in g["params"]]
    for p in tensors:
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
    adam_steps = int(state.get("optimizer_steps", step))
    own, buffers = _trainable(model), router_state(model)
    missing = [n for n, _ in own if n not in weights] + [n for n in buffers if n not in weights]
    unexpected = sorted(set(weights) - {n for n, _ in own} - set(buffers))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {latest_tag(run_dir)} does not match the model: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    inner = inner_optimizer(engine)
    _prime_optimizer_state(engine, adam_steps)
    _link_optimizer_state(engine)
    for name, p in own:
        w = _to_local(weights[name], p, placement)
        if tuple(w.shape) != full_shape(p):
            raise ValueError(f"checkpoint tensor {name}: shape {tuple(w.shape)}, model has {full_shape(p)}")
        m = {k: _to_local(moments[f"{k}/{name}"], p, placement) for k in MOMENTS}
        if is_zero3(p):
            write_partitions(p, w, m)
            continue
        with torch.no_grad():
            p.copy_(w.to(p.dtype))
        if _zero_managed(p):
            safe_set_full_fp32_param(p, w.to(p.device))
        for k in MOMENTS:
            if _zero_managed(p):
                safe_set_full_optimizer_state(p, m[k].to(p.device), k)
            else:
                inner.state[p][k].copy_(m[k].to(p.device))
    with torch.no_grad():
        for name, b in buffers.items():
            b.copy_(weights[name].to(b.dtype))
    _restore_schedule(engine, cfg, step, int(state.get("scheduler_last_epoch", step)))
    folder = checkpoint_dir(run_dir) / latest_tag(run_dir)
    if state["world_size"] == dist.get_world_size() and (folder / "rng.safetensors").exists():
        _set_rng_state(load_file(folder / "rng.safetensors"), state["rng"], dist.get_rank())
    return state


def init_from_run(model: nn.Module, run_dir: Path, task_names: list[str], placement: ExpertPlacement) -> None:
    """`train.init_from`: starts from a finished run's newest weights (no optimizer state, no counters).

    Task-routing tables (task gates, task embeddings) are matched by task name: a task the run did not
    know keeps its fresh row (neutral routing). Every other tensor must match in shape.

    Raises:
        ValueError: Naming the config key, for a run without a checkpoint or a tensor that differs.
    """
    if latest_tag(run_dir) is None:
        raise ValueError(f"config key 'train.init_from': {run_dir} has no checkpoint")
    weights, _, state = read(run_dir)
    old_names = state.get("task_names") or []
    own = dict(_trainable(model)) | router_state(model)
    missing = sorted(set(own) - set(weights))
    if missing:
        raise ValueError(f"config key 'train.init_from': {run_dir} lacks {missing[:3]}")
    with torch.no_grad():
        for name, p in own.items():
            saved = _to_local(weights[name], p, placement) if isinstance(p, nn.Parameter) else weights[name]
            if name.rsplit(".", 1)[-1] in ("task_logits_XE", "task_emb_XD"):
                for x, task in enumerate(task_names):
                    if task in old_names:
                        p[x].copy_(saved[old_names.index(task)].to(p.dtype))
                continue
            if tuple(saved.shape) != tuple(p.shape):
                raise ValueError(
                    f"config key 'train.init_from': tensor {name} has shape {tuple(saved.shape)} in "
                    f"{run_dir}, the model has {tuple(p.shape)}"
                )
            p.copy_(saved.to(p.dtype))


def _restore_schedule(engine, cfg, step: int, last_epoch: int) -> None:
    """Puts the LR schedule and the engine's counters where the saved run left them."""
    factor = lr_lambda(cfg)(last_epoch)
    scheduler = engine.lr_scheduler
    for group in inner_optimizer(engine).param_groups:
        group["lr"] = group["initial_lr"] * factor
    scheduler.last_epoch = last_epoch
    scheduler._last_lr = [g["lr"] for g in inner_optimizer(engine).param_groups]
    engine.global_steps = step
    engine.global_samples = step * engine.train_batch_size()
    engine.micro_steps = step * engine.gradient_accumulation_steps()
