"""What the training loop measures.

Held-out losses and task metrics, fading's expert shares, the logged record of a step, and the final
report (eval.json, utilization.json and its heatmaps).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mtmoe.config import Config
from mtmoe.eval.heatmap import write_heatmaps
from mtmoe.eval.heldout import heldout_losses
from mtmoe.eval.task_metrics import score_tasks
from mtmoe.eval.utilization import gather_utilization, layer_shares, routing_summary, save_utilization
from mtmoe.model.moe_lm import MoELM
from mtmoe.parallel.dist import DistInfo, all_reduce_sum
from mtmoe.parallel.engine import param_bytes_per_rank
from mtmoe.train.fading import fade_start, set_fade_shares


def evaluate(engine, model: MoELM, shards: list, pad_id: int, cfg: Config, info: DistInfo, device) -> dict:
    """Each task's held-out loss (`heldout_losses`), every rank together."""
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


def score(engine, model: MoELM, manifest, names, tokenizer, cfg: Config, info: DistInfo, device) -> dict:
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


def start_fading(engine, model: MoELM, shards, pad_id: int, cfg: Config, info: DistInfo, device) -> dict:
    """Measures each expert's gate-mass share on the held-out set (all ranks) and sets the fade shares."""
    model.set_recording(True)
    evaluate(engine, model, shards, pad_id, cfg, info, device)
    util = gather_utilization(model.lm, [s.name for s in shards])  # a collective: the same on every rank
    shares = {layer: share_E.tolist() for layer, share_E in layer_shares(util, "mass").items()}
    set_fade_shares(model.lm, shares)
    model.set_recording(True)  # the training utilization window starts afresh
    if info.is_main:
        print(f"[mtmoe] router fading starts after step {fade_start(cfg)}; experts weighed by held-out use")
    return shares


def final_report(
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
            "zero_stage": cfg.parallel.zero_stage,
            "param_bytes_per_rank": param_bytes_per_rank(model),  # a collective too
        },
    }
    if is_main:
        save_utilization(util, run_dir / "utilization.json")
        write_heatmaps(util, run_dir / "utilization")
        (run_dir / "eval.json").write_text(json.dumps(result, indent=1))
    return result, util


def train_record(
    engine, model: MoELM, task_loss_X, counts_X, aux, tokens_per_s, manifest, task_names
) -> dict:
    """The losses, learning rate, drops and expert use of one logged step (expert use over its window)."""
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
    # how evenly each layer's training tokens spread over the experts in this logging window
    record.update(routing_summary(gather_utilization(model.lm, names)))
    model.set_recording(True)  # restart the counters for the next logging window
    return record
