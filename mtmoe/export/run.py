"""Rebuilding a finished run's model from its directory: config, checkpoint and utilization."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import yaml

from mtmoe.config import Config, load_config
from mtmoe.data.shards import load_manifest
from mtmoe.export.dense import load_trainable
from mtmoe.model.base import load_tokenizer, resolve_base
from mtmoe.model.moe_lm import MoELM, build_model
from mtmoe.model.walk import moe_blocks
from mtmoe.parallel.expert_parallel import ExpertPlacement
from mtmoe.train import checkpoint
from mtmoe.train.checkpoint import latest_tag
from mtmoe.train.fading import fade_alpha, set_fade_shares


def run_config(run_dir: Path) -> Config:
    """The config a run was trained with (`config.yaml` in its directory)."""
    path = run_dir / "config.yaml"
    if not path.exists():
        raise ValueError(f"--run {run_dir}: no config.yaml; is this a run directory?")
    overrides = []
    for section, values in yaml.safe_load(path.read_text()).items():
        overrides += [
            f"{section}.{k}={yaml.safe_dump(v, default_flow_style=True).strip()}" for k, v in values.items()
        ]
    return load_config(None, overrides)


def model_experts(model: MoELM) -> int:
    """Experts per block of a built model."""
    return next(iter(moe_blocks(model.lm).values())).num_experts


def load_trained_model(
    run_dir: Path, tag: str | None = None, empty_base: bool = False
) -> tuple[Config, MoELM, object]:
    """Rebuilds the MoE model of a run (every expert, one process) and loads a checkpoint's weights.

    Args:
        run_dir: The run directory.
        tag: A checkpoint tag (`step_000040`); default the newest.
        empty_base: Leave the frozen base empty, on the meta device (the streamed export).

    Returns:
        (config, model in eval mode, tokenizer).
    """
    cfg = run_config(run_dir)
    manifest = load_manifest(Path(cfg.data.tokenized))
    tokenizer = load_tokenizer(resolve_base(manifest.tokenizer))
    # The base in full precision, as the export folds into it, even if training stored it narrower.
    full = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, frozen_dtype=""))
    names = [t.name for t in manifest.tasks]
    model = build_model(full, len(tokenizer), len(manifest.tasks), None, names, empty_base=empty_base)
    if latest_tag(run_dir) is None:
        raise ValueError(f"--run {run_dir}: no checkpoint")
    weights, _, state = checkpoint.read(run_dir, tag)
    if cfg.train.trainable != "all":  # only some tensors trained: the rest come from `train.init_from`
        checkpoint.init_from_run(
            model, Path(cfg.train.init_from), names, ExpertPlacement(model_experts(model))
        )
        weights = {**{n: t.detach().clone() for n, t in checkpoint.router_state(model).items()}, **weights}
        weights = {
            **{n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
            **weights,
        }
    load_trainable(model, weights)
    if state.get("fade_shares"):  # a faded run: its blocks are where the fading left them
        set_fade_shares(model.lm, {int(k): v for k, v in state["fade_shares"].items()})
        model.context.fade_alpha = fade_alpha(cfg, state["step"])
    return cfg, model.eval(), tokenizer


def fade_shares(run_dir: Path, tag: str | None = None) -> dict[int, torch.Tensor] | None:
    """The expert shares a faded run blended toward (None when the run did not fade)."""
    _, _, state = checkpoint.read(run_dir, tag)
    shares = state.get("fade_shares")
    return {int(k): torch.tensor(v, dtype=torch.float64) for k, v in shares.items()} if shares else None
