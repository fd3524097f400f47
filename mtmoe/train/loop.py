"""The training loop, top to bottom.

`train` sets the job up (`mtmoe.train.job`: data, process group, model, engine, sampler, balancing),
restores it on resume, then runs steps of (sample, forward, balanced loss, backward, step), with
logging, periodic evaluation and checkpoints, and ends with a checkpoint and the final held-out
evaluation.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from mtmoe.config import Config, to_dict
from mtmoe.eval.task_metrics import metric_summary
from mtmoe.eval.utilization import gather_utilization, restore_utilization_counters, save_utilization_counters
from mtmoe.model.routers import router_options, update_balance_biases
from mtmoe.parallel.dist import all_reduce_sum
from mtmoe.train import checkpoint
from mtmoe.train.evaluation import evaluate, final_report, score, start_fading, train_record
from mtmoe.train.fading import fade_alpha
from mtmoe.train.guard import NonFiniteGuard
from mtmoe.train.job import Job, loop_state, restore, set_up
from mtmoe.train.metrics import MetricsLogger
from mtmoe.train.preempt import Preemption
from mtmoe.train.step import global_counts, micro_batch, train_step


@dataclass
class StepOutcome:
    """What one optimizer step measured, for the observers and the log."""

    t0: float
    alpha: float
    counts_X: torch.Tensor
    step_tokens: int
    step_positions: int
    weights_X: torch.Tensor
    task_loss_X: torch.Tensor
    aux: float
    skipped: bool
    qr_loss: float


def train(cfg: Config, resume: bool = False) -> dict:
    """Runs one training job as configured; every rank calls this.

    Args:
        cfg: The validated config.
        resume: Continue from the newest checkpoint in `train.output_dir`.

    Returns:
        The final evaluation: {"step", "tasks": {name: {"loss", "tokens"}}, "train": {...}}.
    """
    job = set_up(cfg, resume)
    if resume:
        restore(job)
    _start(job)
    guard, preemption, bad_in_a_row = NonFiniteGuard(job.model), Preemption(), 0
    for step in range(job.start_step + 1, cfg.train.steps + 1):
        if step > job.start_step + 1:
            job.val = None  # log only this step's validation batch, if it has one
        outcome = _step(job, step, guard)
        bad_in_a_row = bad_in_a_row + 1 if outcome.skipped else 0
        _stop_after_bad_steps(job, step, bad_in_a_row)
        if not outcome.skipped:  # a NaN would poison the weighter's state
            _observe(job, step, outcome)
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            _log_step(job, step, outcome)
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != cfg.train.steps:
            _evaluate_now(job, step)
        preempted = preemption.agreed()
        if preempted or cfg.train.save_every and step % cfg.train.save_every == 0 and step != cfg.train.steps:
            folder = _save(job, step)
        if preempted:
            return _stop_preempted(job, step, preemption, folder)
    guard.remove()
    preemption.close()
    _save(job, cfg.train.steps)
    return _finish(job)


def _start(job: Job) -> None:
    """Writes the run's config, opens the logger, and takes the first validation batch when needed."""
    if job.info.is_main:
        job.run_dir.mkdir(parents=True, exist_ok=True)
        (job.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(job.cfg), sort_keys=False))
    job.logger = MetricsLogger(job.cfg, job.run_dir, job.info.is_main, job.cfg.train.steps, job.start_step)
    if job.needs_validation and job.start_step == 0:  # CoBa and QR start from the untrained losses
        job.val = _observe_validation(job, 0)
    job.model.set_recording(True)


def _step(job: Job, step: int, guard: NonFiniteGuard) -> StepOutcome:
    """One optimizer step over `train.grad_accum` micro-batches (fading starts here when it is due)."""
    cfg = job.cfg
    alpha = fade_alpha(cfg, step)
    if alpha < 1.0 and job.fade_shares is None:
        job.fade_shares = start_fading(
            job.engine, job.model, job.eval_shards, job.pad_id, cfg, job.info, job.device
        )
    job.model.context.fade_alpha = alpha
    t0 = time.perf_counter()
    size = cfg.train.micro_batch_size
    batches = [
        micro_batch(job.sampler, job.train_shards, size, job.pad_id, cfg.data)
        for _ in range(cfg.train.grad_accum)
    ]
    counts_X, step_tokens, step_positions = global_counts(batches, len(job.known))
    weights_X = job.weighter.weights(counts_X)
    grad_scale = float(job.info.world_size * cfg.train.grad_accum)
    task_loss_X, aux, skipped, qr_loss = train_step(
        job.engine, batches, counts_X, weights_X, job.weighter.normalize_by, grad_scale, job.device, guard,
        step, job.retainer,
    )  # fmt: skip
    if job.routers:  # top-k routers with auxiliary-loss-free balancing
        rate = 0.0 if skipped else router_options(cfg.moe).balance_bias_rate
        update_balance_biases(job.routers, rate, all_reduce_sum)
    job.counters.add_step(time.perf_counter() - t0, step_tokens, counts_X, skipped)
    return StepOutcome(
        t0, alpha, counts_X, step_tokens, step_positions, weights_X, task_loss_X, aux, skipped, qr_loss
    )


def _stop_after_bad_steps(job: Job, step: int, bad_in_a_row: int) -> None:
    """Raises after `train.max_bad_steps` steps in a row with a non-finite loss or gradient."""
    if bad_in_a_row >= job.cfg.train.max_bad_steps:
        raise RuntimeError(
            f"{bad_in_a_row} steps in a row (up to step {step}) had a non-finite loss or gradient; "
            f"stopping (train.max_bad_steps={job.cfg.train.max_bad_steps}). The weights were not updated "
            f"by those steps. Last good checkpoint: {checkpoint.latest_path(job.run_dir)}; continue with "
            "--resume, perhaps with a lower train.lr"
        )


def _observe(job: Job, step: int, outcome: StepOutcome) -> None:
    """Feeds a good step's task losses to the weighter and Quality Retaining, and validates when due."""
    present_X = outcome.counts_X > 0
    job.weighter.observe(outcome.task_loss_X, present_X)
    if job.retainer is not None:
        job.retainer.update_ema()
        job.retainer.observe_train(outcome.task_loss_X, present_X)
    if job.validation is not None and (job.needs_validation or step % job.cfg.train.val_every == 0):
        job.val = _observe_validation(job, step)


def _log_step(job: Job, step: int, o: StepOutcome) -> None:
    """Logs the step's record: losses, weights, tokens, epochs, validation, fading and QR."""
    step_s = time.perf_counter() - o.t0
    tokens_per_s = o.step_tokens / step_s
    record = train_record(
        job.engine, job.model, o.task_loss_X, o.counts_X, o.aux, tokens_per_s, job.manifest, job.task_names
    )
    counters = job.counters
    counters.dropped_assignments += record["moe/dropped"]
    record["step_s"] = step_s  # this rank's wall time of the step (data, forward, backward, optimizer)
    record["tokens_seen"] = counters.tokens
    record["pad_frac"] = 1.0 - o.step_tokens / o.step_positions  # computed positions that are padding
    record["moe/dropped_total"] = counters.dropped_assignments
    record["skipped_steps"] = counters.skipped_steps  # non-finite loss or gradient, all ranks skipped
    for k, name in enumerate(job.known):
        record[f"weight/{name}"] = float(o.weights_X[k])
        record[f"task_tokens_seen/{name}"] = int(counters.task_tokens_X[k])
    for task, name in enumerate(job.task_names):
        record[f"epoch/{name}"] = job.sampler.epoch[task]
    if job.val is not None:  # the validation batch that CoBa and Quality Retaining saw
        val_X, present_X = job.val
        for k, name in enumerate(job.known):
            if present_X[k]:
                record[f"val_loss/{name}"] = float(val_X[k])
    if job.cfg.moe.fade_fraction:
        record["fade_alpha"] = o.alpha
    if job.retainer is not None:
        record["qr/loss"] = o.qr_loss
        record["qr/teachers"] = len(job.retainer.teachers)
    console = {k: v for k, v in record.items() if k == "loss" or k.startswith("loss/")}
    job.logger.log(record, step, console={**console, "tok/s": record["tokens_per_s"]})


def _evaluate_now(job: Job, step: int) -> None:
    """A periodic held-out evaluation: losses, task metrics, and the held-out routing's heatmaps.

    The held-out routing is counted on its own and the training window's counters are put back after.
    """
    window = save_utilization_counters(job.model)
    job.model.set_recording(True)
    losses = evaluate(job.engine, job.model, job.eval_shards, job.pad_id, job.cfg, job.info, job.device)
    util = gather_utilization(job.model.lm, job.known)  # a collective: every rank calls it
    job.model.context.record = False  # generated tokens are not held-out routing
    scored = _score(job)
    restore_utilization_counters(job.model, window)
    job.model.context.record = True
    job.logger.log({f"eval_loss/{n}": v["loss"] for n, v in losses.items()}, step)
    if scored:
        job.logger.log({f"eval_metric/{n}": v["score"] for n, v in scored.items()}, step)
    job.logger.log_utilization(util, step)


def _save(job: Job, step: int) -> Path:
    """A checkpoint of everything a resumed run needs; returns its folder."""
    keep = job.cfg.train.keep_checkpoints
    return checkpoint.save(
        job.engine, job.model, job.placement, job.run_dir, step, loop_state(job), job.info.is_main, keep,
        job.retainer,
    )  # fmt: skip


def _stop_preempted(job: Job, step: int, preemption: Preemption, folder: Path) -> dict:
    """Ends a preempted run after its checkpoint."""
    if job.info.is_main:
        print(
            f"[mtmoe] preempted ({preemption.requested or 'signal on another rank'}) after step "
            f"{step}: saved {folder}; continue with --resume",
            flush=True,
        )
    job.logger.close()
    preemption.close()
    return {"step": step, "preempted": True, "checkpoint": str(folder)}


def _finish(job: Job) -> dict:
    """The final evaluation: held-out losses, task metrics, utilization, eval.json and generations.json."""
    cfg, model = job.cfg, job.model
    model.set_recording(True)  # the final evaluation's routing is the utilization that export uses
    losses = evaluate(job.engine, model, job.eval_shards, job.pad_id, cfg, job.info, job.device)
    model.context.record = False  # generated tokens are not held-out routing
    scored = _score(job)
    for name, s in metric_summary(scored).items():
        losses[name].update(s)
    stats = {"world_size": job.info.world_size, "ep_size": job.placement.ep_size, **job.counters.to_state()}
    result, util = final_report(cfg, model, job.known, losses, stats, job.run_dir, job.info.is_main)
    if job.info.is_main:
        job.logger.log({f"eval_loss/{n}": v["loss"] for n, v in losses.items()}, cfg.train.steps)
        if scored:
            answers = {name: r["answers"] for name, r in scored.items()}
            (job.run_dir / "generations.json").write_text(json.dumps(answers, indent=1, ensure_ascii=False))
            job.logger.log({f"eval_metric/{n}": v["score"] for n, v in scored.items()}, cfg.train.steps)
        job.logger.log_utilization(util, cfg.train.steps)
    job.logger.close()
    return result


def _score(job: Job) -> dict:
    return score(
        job.engine, job.model, job.manifest, job.task_names, job.tokenizer, job.cfg, job.info, job.device
    )


def _observe_validation(job: Job, step: int):
    """One validation batch, fed to the weighter and to Quality Retaining; returns (losses, present)."""
    losses_X, present_X = job.validation.losses(job.engine.module, job.device)
    job.weighter.observe_validation(losses_X, present_X)
    if job.retainer is not None:
        job.retainer.observe_validation(losses_X, present_X, step)
    return losses_X, present_X
