"""A training job: what it holds across its steps, how it is set up, restored and saved.

`set_up` builds the job (data, process group, model, engine, sampler, balancing) and checks the
task-keyed config against the manifest; `restore` continues it from its newest checkpoint; `loop_state`
is what a checkpoint keeps besides the tensors. `mtmoe.train.loop` runs its steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mtmoe.balance.quality_retain import QualityRetainer
from mtmoe.balance.validation import ValidationStream
from mtmoe.balance.weighters import TaskWeighter, build_weighter, weighter_options
from mtmoe.config import Config, to_dict
from mtmoe.data.sampler import MixingSampler
from mtmoe.data.shards import Manifest, load_manifest, open_shard, validation_split
from mtmoe.model.base import load_tokenizer, resolve_base
from mtmoe.model.moe_lm import (
    MoELM,
    balance_bias_routers,
    block_num_experts,
    build_model,
    freeze_all_but_task_routing,
)
from mtmoe.model.routers import check_router
from mtmoe.parallel.dist import DistInfo, device_for, init_distributed
from mtmoe.parallel.engine import build_engine
from mtmoe.parallel.expert_parallel import ExpertPlacement, create_placement
from mtmoe.train import checkpoint
from mtmoe.train.counters import RunCounters
from mtmoe.train.fading import set_fade_shares
from mtmoe.train.metrics import MetricsLogger


@dataclass(eq=False)
class Job:
    """What one training job holds across its steps (the same on every rank but for its data)."""

    cfg: Config
    info: DistInfo
    device: torch.device
    placement: ExpertPlacement
    manifest: Manifest
    known: list[str]  # every task of the manifest, in id order
    task_names: list[str]  # the tasks trained
    train_shards: list
    eval_shards: list
    tokenizer: Any
    model: MoELM
    engine: Any
    routers: list
    sampler: MixingSampler
    weighter: TaskWeighter
    retainer: QualityRetainer | None
    validation: ValidationStream | None
    needs_validation: bool  # CoBa or Quality Retaining reads a validation batch every step
    run_dir: Path
    counters: RunCounters
    start_step: int = 0
    fade_shares: dict[int, list[float]] | None = None
    logger: MetricsLogger | None = None
    val: tuple[torch.Tensor, torch.Tensor] | None = None  # the newest validation batch, to log

    @property
    def pad_id(self) -> int:
        """The tokenizer's padding token."""
        return self.tokenizer.pad_token_id


def set_up(cfg: Config, resume: bool) -> Job:
    """The data, the process group, the model and its engine, the sampler and the balancing."""
    weighter_options(cfg.balance)  # a bad weighter, router or option fails now, before any process group
    check_router(cfg)
    try:
        manifest = load_manifest(Path(cfg.data.tokenized))
    except ValueError as e:
        raise ValueError(f"config key 'data.tokenized': {e}") from None
    known, task_names = select_tasks(cfg, manifest)
    info = init_distributed(cfg.parallel.backend)
    placement = create_placement(cfg.parallel.ep_size, block_num_experts(cfg, known))
    device = device_for(info)
    train_shards = [open_shard(manifest, name, "train") for name in task_names]
    eval_shards = [open_shard(manifest, name, "eval") for name in task_names]
    tokenizer = load_tokenizer(resolve_base(manifest.tokenizer))
    model = build_model(cfg, len(tokenizer), len(known), placement, known).to(device)
    if cfg.train.init_from and not resume:
        checkpoint.init_from_run(model, Path(cfg.train.init_from), known, placement)
    if cfg.train.trainable == "task_routing":
        freeze_all_but_task_routing(model)
    routers = balance_bias_routers(model)
    engine = build_engine(model, cfg, info.world_size, placement)
    sampler = MixingSampler(
        [min(len(s), int(cfg.data.caps.get(s.name, len(s)))) for s in train_shards],
        cfg.data.mixing,
        cfg.data.temperature,
        cfg.train.seed,
        info.rank,
        info.world_size,
        [float(cfg.data.upsample.get(name, 1.0)) for name in task_names],
    )
    weighter = build_weighter(cfg.balance, known)
    b, retainer = cfg.balance, None
    if b.quality_retain:
        retainer = QualityRetainer(model, len(known), b.qr_coef, b.qr_ema, b.qr_smooth, b.qr_warmup)
    needs_validation = weighter.needs_validation or retainer is not None
    validation = None
    if needs_validation or cfg.train.val_every:
        split = validation_split(manifest, task_names)
        if split == "eval" and info.is_main:
            print(
                "[mtmoe] note: the manifest has no valid split for every task, so validation reads the eval"
                " split, which the report also scores; tokenize with --valid-fraction for a separate one"
            )
        validation = ValidationStream(
            [open_shard(manifest, name, split) for name in task_names],
            cfg.train.micro_batch_size,
            len(known),
            tokenizer.pad_token_id,
            cfg.train.seed,
            info.rank,
            info.world_size,
        )
    return Job(
        cfg, info, device, placement, manifest, known, task_names, train_shards, eval_shards, tokenizer,
        model, engine, routers, sampler, weighter, retainer, validation, needs_validation,
        Path(cfg.train.output_dir), RunCounters.zeros(len(known)),
    )  # fmt: skip


def restore(job: Job) -> None:
    """Continues from the newest checkpoint: weights, optimizer, counters, fading, balancing and data."""
    state = checkpoint.load(job.engine, job.model, job.placement, job.run_dir, job.cfg)
    job.start_step, job.counters = state["step"], RunCounters.from_state(state["counters"])
    if state["fade_shares"]:
        job.fade_shares = {int(k): v for k, v in state["fade_shares"].items()}
        set_fade_shares(job.model.lm, job.fade_shares)
    job.weighter.load_state_dict(state["weighter"])
    if job.retainer is not None:
        checkpoint.load_quality(job.run_dir, job.retainer, job.placement, state)
    job.sampler.load_state_dict(state["data"]["train"])
    if job.validation is not None and state["data"]["valid"] is not None:
        job.validation.load_state_dict(state["data"]["valid"])
    if job.info.is_main:
        was = f"world {state['world_size']}, ep_size {state['ep_size']}"
        now = f"world {job.info.world_size}, ep_size {job.placement.ep_size}"
        print(f"[mtmoe] resumed from step {job.start_step} ({was}) on {now}")
        if state["train_batch_size"] != job.engine.train_batch_size():
            print(
                f"[mtmoe] note: the global batch changed from {state['train_batch_size']} to "
                f"{job.engine.train_batch_size()} rows; the data continues, but in other batches"
            )


def select_tasks(cfg: Config, manifest) -> tuple[list[str], list[str]]:
    """(all manifest tasks in id order, the tasks to train); validates the task-keyed config."""
    known = [t.name for t in manifest.tasks]
    unknown = [name for name in cfg.data.tasks if name not in known]
    if unknown:
        raise ValueError(f"config key 'data.tasks': unknown task(s) {unknown}; {manifest.root} has {known}")
    task_names = cfg.data.tasks or known
    for key, table in (("data.caps", cfg.data.caps), ("data.upsample", cfg.data.upsample)):
        bad = sorted(set(table) - set(task_names)) + sorted(k for k, v in table.items() if not float(v) > 0)
        if bad:
            raise ValueError(
                f"config key {key!r}: {bad} are not trained tasks with a value > 0 ({task_names})"
            )
    return known, task_names


def loop_state(job: Job) -> dict:
    """Everything besides the tensors that a resumed run needs (JSON; the same on every rank)."""
    return {
        "counters": job.counters.to_state(),
        "fade_shares": job.fade_shares,
        "quality": None if job.retainer is None else job.retainer.state_dict(),
        "weighter": job.weighter.state_dict(),
        "data": {
            "train": job.sampler.state_dict(),
            "valid": None if job.validation is None else job.validation.state_dict(),
        },
        "config": to_dict(job.cfg),
        "task_names": job.known,  # every task of the manifest, in id order
    }
