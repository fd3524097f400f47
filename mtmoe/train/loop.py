"""The training loop, top to bottom.

Set up, then steps of (sample, forward, balanced loss, backward, step), with logging, periodic
evaluation and checkpoints, and a final held-out evaluation.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from mtmoe.balance.quality_retain import QualityRetainer, distillation_sums, retain_loss
from mtmoe.balance.task_loss import balanced_loss, task_loss_sums, task_token_counts
from mtmoe.balance.validation import ValidationStream
from mtmoe.balance.weighters import build_weighter
from mtmoe.config import Config, DataConfig, to_dict
from mtmoe.data.collate import Batch, collate, pack
from mtmoe.data.sampler import MixingSampler
from mtmoe.data.shards import load_manifest, open_shard
from mtmoe.eval.heatmap import write_heatmaps
from mtmoe.eval.heldout import heldout_losses
from mtmoe.eval.task_metrics import metric_summary, score_tasks
from mtmoe.eval.utilization import expert_shares, gather_utilization, layer_shares, save_utilization
from mtmoe.model.base import load_tokenizer, resolve_base
from mtmoe.model.moe_lm import (
    MoELM,
    balance_bias_routers,
    block_num_experts,
    build_model,
    freeze_all_but_task_routing,
)
from mtmoe.model.router import update_balance_biases
from mtmoe.model.token_loss import target_mask
from mtmoe.parallel.dist import DistInfo, all_reduce_sum, device_for, init_distributed
from mtmoe.parallel.engine import build_engine
from mtmoe.parallel.expert_parallel import create_placement
from mtmoe.train import checkpoint, faults
from mtmoe.train.counters import RunCounters
from mtmoe.train.fading import fade_alpha, fade_start, set_fade_shares
from mtmoe.train.guard import NonFiniteGuard
from mtmoe.train.metrics import MetricsLogger
from mtmoe.train.preempt import Preemption


def train(cfg: Config, resume: bool = False) -> dict:
    """Runs one training job as configured; every rank calls this.

    Args:
        cfg: The validated config.
        resume: Continue from the newest checkpoint in `train.output_dir`.

    Returns:
        The final evaluation: {"step", "tasks": {name: {"loss", "tokens"}}, "train": {...}}.
    """
    try:
        manifest = load_manifest(Path(cfg.data.tokenized))
    except ValueError as e:
        raise ValueError(f"config key 'data.tokenized': {e}") from None
    known, task_names = _select_tasks(cfg, manifest)
    info = init_distributed(cfg.parallel.backend)
    all_names = [t.name for t in manifest.tasks]
    placement = create_placement(cfg.parallel.ep_size, block_num_experts(cfg, all_names))
    device = device_for(info)
    run_dir = Path(cfg.train.output_dir)
    train_shards = [open_shard(manifest, name, "train") for name in task_names]
    eval_shards = [open_shard(manifest, name, "eval") for name in task_names]
    tokenizer = load_tokenizer(resolve_base(manifest.tokenizer))
    num_tasks = len(manifest.tasks)

    model = build_model(cfg, len(tokenizer), num_tasks, placement, all_names).to(device)
    if cfg.train.init_from and not resume:
        checkpoint.init_from_run(model, Path(cfg.train.init_from), all_names, placement)
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
    retainer = None
    if cfg.balance.quality_retain:
        b = cfg.balance
        retainer = QualityRetainer(model, num_tasks, b.qr_coef, b.qr_ema, b.qr_smooth, b.qr_warmup)
    validation = None
    needs_validation = weighter.needs_validation or retainer is not None
    if needs_validation or cfg.train.val_every:
        validation = ValidationStream(
            eval_shards,
            cfg.train.micro_batch_size,
            num_tasks,
            tokenizer.pad_token_id,
            cfg.train.seed,
            info.rank,
            info.world_size,
        )
    start_step, counters, fade_shares = 0, RunCounters.zeros(num_tasks), None
    if resume:
        state = checkpoint.load(engine, model, placement, run_dir, cfg)
        start_step, counters = state["step"], RunCounters.from_state(state["counters"])
        fade_shares = {int(k): v for k, v in state["fade_shares"].items()} if state["fade_shares"] else None
        if fade_shares is not None:
            set_fade_shares(model.lm, fade_shares)
        weighter.load_state_dict(state["weighter"])
        if retainer is not None:
            checkpoint.load_quality(run_dir, retainer, placement, state)
        sampler.load_state_dict(state["data"]["train"])
        if validation is not None and state["data"]["valid"] is not None:
            validation.load_state_dict(state["data"]["valid"])
        if info.is_main:
            was = f"world {state['world_size']}, ep_size {state['ep_size']}"
            now = f"world {info.world_size}, ep_size {placement.ep_size}"
            print(f"[mtmoe] resumed from step {start_step} ({was}) on {now}")
            if state["train_batch_size"] != engine.train_batch_size():
                print(
                    f"[mtmoe] note: the global batch changed from {state['train_batch_size']} to "
                    f"{engine.train_batch_size()} rows; the data continues, but in other batches"
                )
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    logger = MetricsLogger(cfg, run_dir, info.is_main, cfg.train.steps, start_step)
    val = None  # the newest validation batch's (losses, present), when a validation stream runs
    if needs_validation and start_step == 0:  # CoBa and Quality Retaining start from the untrained losses
        val = _observe_validation(validation, weighter, retainer, engine, device, 0)

    model.set_recording(True)
    grad_scale = float(info.world_size * cfg.train.grad_accum)
    guard, preemption, bad_in_a_row = NonFiniteGuard(model), Preemption(), 0
    for step in range(start_step + 1, cfg.train.steps + 1):
        if step > start_step + 1:
            val = None  # log only this step's validation batch, if it has one
        alpha = fade_alpha(cfg, step)
        if alpha < 1.0 and fade_shares is None:
            fade_shares = _start_fading(engine, model, eval_shards, tokenizer.pad_token_id, cfg, info, device)
        model.context.fade_alpha = alpha
        t0 = time.perf_counter()
        batches = [
            _micro_batch(sampler, train_shards, cfg.train.micro_batch_size, tokenizer.pad_token_id, cfg.data)
            for _ in range(cfg.train.grad_accum)
        ]
        counts_X, step_tokens, step_positions = _global_counts(batches, num_tasks)
        weights_X = weighter.weights(counts_X)
        task_loss_X, aux, skipped, qr_loss = _train_step(
            engine,
            batches,
            counts_X,
            weights_X,
            weighter.normalize_by,
            grad_scale,
            device,
            guard,
            step,
            retainer,
        )
        update_balance_biases(routers, 0.0 if skipped else cfg.moe.balance_bias_rate, all_reduce_sum)
        counters.add_step(time.perf_counter() - t0, step_tokens, counts_X, skipped)
        bad_in_a_row = bad_in_a_row + 1 if skipped else 0
        if bad_in_a_row >= cfg.train.max_bad_steps:
            raise RuntimeError(
                f"{bad_in_a_row} steps in a row (up to step {step}) had a non-finite loss or gradient; "
                f"stopping (train.max_bad_steps={cfg.train.max_bad_steps}). The weights were not updated "
                f"by those steps. Last good checkpoint: {checkpoint.latest_path(run_dir)}; continue with "
                "--resume, perhaps with a lower train.lr"
            )
        if not skipped:  # a NaN would poison the weighter's state
            weighter.observe(task_loss_X, counts_X > 0)
            if retainer is not None:
                retainer.update_ema()
                retainer.observe_train(task_loss_X, counts_X > 0)
            if validation is not None and (needs_validation or step % cfg.train.val_every == 0):
                val = _observe_validation(validation, weighter, retainer, engine, device, step)

        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            record = _train_record(
                engine,
                model,
                task_loss_X,
                counts_X,
                aux,
                step_tokens / (time.perf_counter() - t0),
                manifest,
                task_names,
            )
            counters.dropped_assignments += record["moe/dropped"]
            record["tokens_seen"] = counters.tokens
            record["pad_frac"] = 1.0 - step_tokens / step_positions  # computed positions that are padding
            record["moe/dropped_total"] = counters.dropped_assignments
            record["skipped_steps"] = counters.skipped_steps  # non-finite loss or gradient, all ranks skipped
            for k, name in enumerate(known):
                record[f"weight/{name}"] = float(weights_X[k])
                record[f"task_tokens_seen/{name}"] = int(counters.task_tokens_X[k])
            for task, name in enumerate(task_names):
                record[f"epoch/{name}"] = sampler.epoch[task]
            if val is not None:  # the validation batch that CoBa and Quality Retaining saw
                val_X, present_X = val
                for k, name in enumerate(known):
                    if present_X[k]:
                        record[f"val_loss/{name}"] = float(val_X[k])
            if cfg.moe.fade_fraction:
                record["fade_alpha"] = alpha
            if retainer is not None:
                record["qr/loss"] = qr_loss
                record["qr/teachers"] = len(retainer.teachers)
            console = {k: v for k, v in record.items() if k == "loss" or k.startswith("loss/")}
            logger.log(record, step, console={**console, "tok/s": record["tokens_per_s"]})
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != cfg.train.steps:
            model.context.record = False  # keep held-out routing out of the training utilization
            losses = _evaluate(engine, model, eval_shards, tokenizer.pad_token_id, cfg, info, device)
            scored = _score(engine, model, manifest, task_names, tokenizer, cfg, info, device)
            model.context.record = True
            logger.log({f"eval_loss/{n}": v["loss"] for n, v in losses.items()}, step)
            if scored:
                logger.log({f"eval_metric/{n}": v["score"] for n, v in scored.items()}, step)
        preempted = preemption.agreed()
        if preempted or cfg.train.save_every and step % cfg.train.save_every == 0 and step != cfg.train.steps:
            state = _loop_state(cfg, counters, weighter, sampler, validation, retainer, fade_shares)
            keep = cfg.train.keep_checkpoints
            folder = checkpoint.save(
                engine, model, placement, run_dir, step, state, info.is_main, keep, retainer
            )
        if preempted:
            if info.is_main:
                print(
                    f"[mtmoe] preempted ({preemption.requested or 'signal on another rank'}) after step "
                    f"{step}: saved {folder}; continue with --resume",
                    flush=True,
                )
            logger.close()
            preemption.close()
            return {"step": step, "preempted": True, "checkpoint": str(folder)}

    guard.remove()
    preemption.close()
    state = _loop_state(cfg, counters, weighter, sampler, validation, retainer, fade_shares)
    keep = cfg.train.keep_checkpoints
    checkpoint.save(engine, model, placement, run_dir, cfg.train.steps, state, info.is_main, keep, retainer)
    model.set_recording(True)  # the final evaluation's routing is the utilization that export uses
    losses = _evaluate(engine, model, eval_shards, tokenizer.pad_token_id, cfg, info, device)
    model.context.record = False  # generated tokens are not held-out routing
    scored = _score(engine, model, manifest, task_names, tokenizer, cfg, info, device)
    for name, s in metric_summary(scored).items():
        losses[name].update(s)
    train_stats = {"world_size": info.world_size, "ep_size": placement.ep_size, **counters.to_state()}
    result, util = _final_report(cfg, model, known, losses, train_stats, run_dir, info.is_main)
    if info.is_main:
        logger.log({f"eval_loss/{n}": v["loss"] for n, v in losses.items()}, cfg.train.steps)
        if scored:
            answers = {name: r["answers"] for name, r in scored.items()}
            (run_dir / "generations.json").write_text(json.dumps(answers, indent=1, ensure_ascii=False))
            logger.log({f"eval_metric/{n}": v["score"] for n, v in scored.items()}, cfg.train.steps)
        logger.log_utilization(util, cfg.train.steps)
    logger.close()
    return result


def _select_tasks(cfg: Config, manifest) -> tuple[list[str], list[str]]:
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


def _final_report(
    cfg: Config, model: MoELM, known, losses, stats, run_dir: Path, is_main: bool
) -> tuple[dict, dict]:
    """Writes eval.json, utilization.json and its heatmaps (rank 0); returns (evaluation, utilization)."""
    util = gather_utilization(model.lm, known)  # a collective: every rank calls it
    result = {
        "step": cfg.train.steps,
        "tasks": losses,
        "train": {
            "steps": cfg.train.steps,
            "wall_s": stats["wall_s"],
            "tokens": stats["tokens"],
            "tokens_per_s": stats["tokens"] / stats["wall_s"] if stats["wall_s"] else 0.0,
            "world_size": stats["world_size"],
            "ep_size": stats["ep_size"],
            "dropped_assignments": stats["dropped_assignments"],
            "skipped_steps": stats["skipped_steps"],
        },
    }
    if is_main:
        save_utilization(util, run_dir / "utilization.json")
        write_heatmaps(util, run_dir / "utilization")
        (run_dir / "eval.json").write_text(json.dumps(result, indent=1))
    return result, util


def _loop_state(
    cfg: Config,
    counters: RunCounters,
    weighter,
    sampler: MixingSampler,
    validation: ValidationStream | None,
    retainer: QualityRetainer | None,
    fade_shares: dict[int, list[float]] | None,
) -> dict:
    """Everything besides the tensors that a resumed run needs (JSON; the same on every rank)."""
    return {
        "counters": counters.to_state(),
        "fade_shares": fade_shares,
        "quality": None if retainer is None else retainer.state_dict(),
        "weighter": weighter.state_dict(),
        "data": {
            "train": sampler.state_dict(),
            "valid": None if validation is None else validation.state_dict(),
        },
        "config": to_dict(cfg),
        "task_names": [t.name for t in load_manifest(Path(cfg.data.tokenized)).tasks],
    }


def _start_fading(engine, model: MoELM, shards, pad_id: int, cfg: Config, info: DistInfo, device) -> dict:
    """Measures each expert's gate-mass share on the held-out set (all ranks) and sets the fade shares."""
    model.set_recording(True)
    _evaluate(engine, model, shards, pad_id, cfg, info, device)
    util = gather_utilization(model.lm, [s.name for s in shards])  # a collective: the same on every rank
    shares = {layer: share_E.tolist() for layer, share_E in layer_shares(util, "mass").items()}
    set_fade_shares(model.lm, shares)
    model.set_recording(True)  # the training utilization window starts afresh
    if info.is_main:
        print(f"[mtmoe] router fading starts after step {fade_start(cfg)}; experts weighed by held-out use")
    return shares


def _observe_validation(validation, weighter, retainer, engine, device, step: int):
    """One validation batch, fed to the weighter and to Quality Retaining; returns (losses, present)."""
    losses_X, present_X = validation.losses(engine.module, device)
    weighter.observe_validation(losses_X, present_X)
    if retainer is not None:
        retainer.observe_validation(losses_X, present_X, step)
    return losses_X, present_X


def _micro_batch(sampler: MixingSampler, shards: list, size: int, pad_id: int, data: DataConfig) -> Batch:
    draws = sampler.draw_batch(size)
    samples = [shards[d.task][d.index] for d in draws]
    task_ids = [shards[d.task].task_id for d in draws]
    if data.packing:
        return pack(samples, task_ids, pad_id, data.pack_length)
    return collate(samples, task_ids, pad_id)


def _global_counts(batches: list[Batch], num_tasks: int) -> tuple[torch.Tensor, int, int]:
    """Per-task target tokens, real tokens and computed positions (real plus padding), summed over ranks.

    Everything is over the whole global batch.
    """
    local = torch.zeros(num_tasks + 2, dtype=torch.float64)
    for b in batches:
        local[:num_tasks] += task_token_counts(b.loss_mask_BS, b.task_ids, num_tasks)
        local[num_tasks] += b.num_tokens()
        local[num_tasks + 1] += b.input_ids_BS.numel()
    total = all_reduce_sum(local)
    return total[:num_tasks], int(total[num_tasks]), int(total[num_tasks + 1])


def _train_step(
    engine,
    batches: list[Batch],
    counts_X: torch.Tensor,
    weights_X: torch.Tensor,
    normalize_by: str,
    grad_scale: float,
    device,
    guard: NonFiniteGuard,
    step: int,
    retainer: QualityRetainer | None,
):
    """One optimizer step over the micro-batches.

    Returns:
        (global per-task losses, mean weighted router loss, skipped, Quality Retaining term):
        `skipped` is True when a rank saw a non-finite loss or gradient; then no rank changed its
        weights or optimizer state.
    """
    sums_X = torch.zeros_like(counts_X)
    aux_sum, qr_sum, skipped = 0.0, 0.0, False
    adamw = checkpoint.inner_optimizer(engine)
    for i, batch in enumerate(batches):
        batch = batch.to(device)
        teachers = _teacher_logits(engine.module, batch, retainer) if retainer and retainer.teachers else None
        out = engine(
            batch.input_ids_BS,
            batch.attention_mask_BS,
            batch.loss_mask_BS,
            batch.task_ids,
            return_logits=teachers is not None,
            position_ids_BS=batch.position_ids_BS,
        )
        loss_BS, aux = out[0], out[1]
        mb_sums_X = task_loss_sums(loss_BS, batch.task_ids, len(counts_X))
        loss = balanced_loss(mb_sums_X, counts_X, grad_scale, weights_X, normalize_by) + aux
        if teachers is not None:
            qr = _retain_term(out[2], batch, teachers, retainer, counts_X, grad_scale)
            loss = loss + qr
            qr_sum += float(qr.detach()) / grad_scale
        loss = faults.nan_loss(loss, step, dist.get_rank())
        guard.check_loss(loss)
        engine.backward(loss)
        if i == len(batches) - 1:  # the optimizer steps in this engine.step(): every rank agrees first
            skipped = guard.agree()
            adamw.skip_next_step = skipped
        engine.step()
        adamw.skip_next_step = False
        sums_X += mb_sums_X.detach().double().cpu()
        aux_sum += float(aux.detach())
    task_loss_X = all_reduce_sum(sums_X) / counts_X.clamp_min(1)
    qr_total = float(all_reduce_sum(torch.tensor([qr_sum], dtype=torch.float64))[0])
    return task_loss_X, aux_sum / len(batches), skipped, qr_total


@torch.no_grad()
def _teacher_logits(module: MoELM, batch: Batch, retainer: QualityRetainer) -> dict[int, torch.Tensor]:
    """Each teacher's logits at the target tokens of its task's rows (teacher weights swapped in).

    Every rank runs every teacher (a one-row filler when it has no row of that task, its result
    dropped): an expert-parallel forward is a collective.
    """
    out = {}
    was_training, recording = module.training, module.context.record
    module.eval()  # dropless, like evaluation
    module.context.record = False
    for task in sorted(retainer.teachers):
        rows_B = (batch.task_ids == task).nonzero(as_tuple=True)[0]
        sub = rows_B if len(rows_B) else torch.zeros(1, dtype=torch.long, device=rows_B.device)
        with retainer.teacher_weights(task):
            logits_NV = module(
                batch.input_ids_BS[sub],
                batch.attention_mask_BS[sub],
                batch.loss_mask_BS[sub],
                batch.task_ids[sub],
                return_logits=True,
            )[2]
        if len(rows_B):
            out[task] = logits_NV
    module.train(was_training)
    module.context.record = recording
    return out


def _retain_term(
    student_logits_NV, batch: Batch, teachers: dict, retainer: QualityRetainer, counts_X, grad_scale: float
) -> torch.Tensor:
    """This micro-batch's Quality Retaining loss (see `mtmoe.balance.quality_retain`)."""
    target_bi, _ = target_mask(batch.loss_mask_BS).nonzero(as_tuple=True)
    task_N = batch.task_ids[target_bi]
    kl_sums_X = student_logits_NV.new_zeros(retainer.num_tasks)
    for task, teacher_NV in teachers.items():
        mine_N = task_N == task  # the student's targets in this task's rows, in the teacher's order
        kl_sums_X = kl_sums_X + distillation_sums(
            student_logits_NV[mine_N], teacher_NV, task_N[mine_N], retainer.num_tasks
        )
    return retain_loss(kl_sums_X, counts_X, retainer.ce_X, retainer.coef, grad_scale)


def _train_record(
    engine, model: MoELM, task_loss_X, counts_X, aux, tokens_per_s, manifest, task_names
) -> dict:
    names = [t.name for t in manifest.tasks]
    present = [k for k in range(len(names)) if counts_X[k] > 0]
    record = {
        "loss": float(task_loss_X[present].mean()) if present else 0.0,
        "router_loss": aux,  # aux_loss_coef · load balance + z_loss_coef · z-loss, mean over blocks
        "lr": engine.get_lr()[0],
        "tokens_per_s": tokens_per_s,
    }
    for k in present:
        record[f"loss/{names[k]}"] = float(task_loss_X[k])
        record[f"task_tokens/{names[k]}"] = int(counts_X[k])
    ctx = model.context
    routed, dropped = all_reduce_sum(torch.tensor([ctx.routed, ctx.dropped], dtype=torch.float64)).tolist()
    ctx.routed = ctx.dropped = 0
    record["moe/dropped"] = int(dropped)  # over capacity in this logging window, all ranks
    record["moe/drop_frac"] = dropped / max(routed, 1.0)
    util = gather_utilization(model.lm, names)
    for layer, share_E in layer_shares(util, "tokens").items():
        for e, share in enumerate(share_E.tolist()):
            record[f"expert_util/L{layer:02d}/e{e}"] = share
    for k in present:  # per task: which experts its tokens went to in this logging window
        for layer, share_E in expert_shares(util, names[k], "tokens").items():
            for e, share in enumerate(share_E.tolist()):
                record[f"expert_util/{names[k]}/L{layer:02d}/e{e}"] = share
    model.set_recording(True)  # restart the counters for the next logging window
    return record


def _score(engine, model: MoELM, manifest, names, tokenizer, cfg: Config, info: DistInfo, device) -> dict:
    """The declared metric of every trained task that has one, on greedy answers (see `score_tasks`)."""
    if not cfg.train.eval_metrics:
        return {}
    engine.eval()
    scored = score_tasks(
        model.next_token_logits,
        manifest,
        names,
        tokenizer,
        cfg.data.eval_gen_samples,
        batch_size=2 * cfg.train.micro_batch_size,
        rank=info.rank,
        world=info.world_size,
        device=device,
        progress=info.is_main,
    )
    engine.train()
    return scored


def _evaluate(engine, model: MoELM, shards: list, pad_id: int, cfg: Config, info: DistInfo, device) -> dict:
    engine.eval()

    def loss_fn(ids, attn, loss_mask, task):
        return engine.module(ids, attn, loss_mask, task)[0]

    losses = heldout_losses(
        loss_fn,
        shards,
        pad_id,
        2 * cfg.train.micro_batch_size,
        cfg.data.eval_max_samples,
        info.rank,
        info.world_size,
        device,
    )
    engine.train()
    return losses
