"""The `packing` mode: sequence packing on the demo data, one training step packed against padded.

The demo recipe and real micro-batches of the demo's tokenized tasks, drawn by the training loop's own
`MixingSampler` (proportional, seed 0). Each round takes the next micro-batch and times one forward +
backward of it twice: right-padded rows (`collate`) and packed rows (`pack`, `pack_length` 0). Every
micro-batch is first checked to give the same per-task loss sums and gradients both ways. CPU time,
order alternating each round, medians and the median of per-round ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import cli
from benchmarks.harness import machine_info, timing_settings
from benchmarks.models import REPO, VOCAB, perturb_lora_b, recipe
from benchmarks.tables import paragraph, table
from mtmoe.balance.task_loss import task_loss_sums
from mtmoe.data.collate import Batch, collate, pack
from mtmoe.data.sampler import MixingSampler
from mtmoe.data.shards import load_manifest, open_shard
from mtmoe.model.moe_lm import MoELM, build_model

DATA = REPO / "data" / "demo" / "tokenized"
SAMPLES = 8  # per micro-batch
VARIANTS = ("padded", "packed")
CLI = cli.CliDefaults(
    cli.RESULTS / "step_packing.json", rounds=8, iters=None, warmup=1, quick=(2, 1, 1), tiny=True
)


def micro_batches(n: int, data: Path) -> tuple[list[tuple[Batch, Batch]], int]:
    """N micro-batches of the tokenized tasks in `data`, each as (padded, packed); and the number of tasks."""
    manifest = load_manifest(data)
    names = [t.name for t in manifest.tasks]
    shards = [open_shard(manifest, name, "train") for name in names]
    sampler = MixingSampler([len(s) for s in shards], "proportional", 2.0, seed=0, rank=0, world=1)
    out = []
    for _ in range(n):
        draws = sampler.draw_batch(SAMPLES)
        samples = [shards[d.task][d.index] for d in draws]
        tasks = [shards[d.task].task_id for d in draws]
        out.append((collate(samples, tasks, 0), pack(samples, tasks, 0)))
    return out, len(names)


def objective(model: MoELM, batch: Batch, num_tasks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward of the summed target loss plus the router loss; returns (per-task sums, loss)."""
    for p in model.parameters():
        p.grad = None
    loss_BS, aux = model(batch.input_ids_BS, batch.attention_mask_BS, batch.loss_mask_BS, batch.task_ids,
                         position_ids_BS=batch.position_ids_BS)  # fmt: skip
    sums_X = task_loss_sums(loss_BS, batch.task_ids, num_tasks)
    loss = sums_X.sum() / max(int((batch.loss_mask_BS[:, 1:] > 0).sum()), 1) + aux
    loss.backward()
    return sums_X.detach(), loss.detach()


def check_equal(model: MoELM, padded: Batch, packed: Batch, num_tasks: int) -> float:
    """Asserts equal per-task loss sums and gradients; returns the largest relative gradient difference."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    sums_a, _ = objective(model, padded, num_tasks)
    grads_a = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
    sums_b, _ = objective(model, packed, num_tasks)
    torch.testing.assert_close(sums_b, sums_a, rtol=1e-4, atol=1e-3)
    worst = 0.0
    for n, g in grads_a.items():
        torch.testing.assert_close(params[n].grad, g, rtol=1e-3, atol=1e-6, msg=n)
        worst = max(worst, float((params[n].grad - g).norm() / g.norm().clamp_min(1e-12)))
    return worst


def positions(batch: Batch) -> dict[str, int]:
    return {
        "rows": batch.input_ids_BS.shape[0],
        "positions": batch.input_ids_BS.numel(),
        "tokens": batch.num_tokens(),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Checks every micro-batch's losses and grads both ways, then times them; returns the result record."""
    rounds, warmup, data, tiny = args.rounds, args.warmup, args.data, args.tiny
    cfg = recipe(tiny, [f"data.tokenized={data}"])
    batches, num_tasks = micro_batches(rounds + warmup, data)
    torch.manual_seed(0)
    model = build_model(cfg, VOCAB, num_tasks, None, [t.name for t in load_manifest(data).tasks])
    perturb_lora_b(model, 0)  # LoRA B starts at zero; make the experts matter for the gradient check
    model.train()
    worst = max(check_equal(model, a, b, num_tasks) for a, b in batches[:2])
    per_round: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r, pair in enumerate(batches):
        order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
        for name in order:
            batch = pair[VARIANTS.index(name)]
            t0 = time.process_time()
            objective(model, batch, num_tasks)
            if r >= warmup:
                per_round[name].append(time.process_time() - t0)
    shape = [{v: positions(pair[i]) for i, v in enumerate(VARIANTS)} for pair in batches[warmup:]]
    pos = {v: sum(s[v]["positions"] for s in shape) for v in VARIANTS}
    tokens = sum(s["padded"]["tokens"] for s in shape)
    return {
        "benchmark": "step packing",
        "setup": {
            "recipe": "launch/recipes/demo.yaml",
            "samples_per_micro_batch": SAMPLES,
            "pack_length": 0,
            "tiny": tiny,
        },
        "timing": timing_settings(rounds, 1, warmup)
        | {"order": "alternating each round, one micro-batch per round"},
        "machine": machine_info(),
        "max_relative_grad_diff": worst,
        "median_s": {v: statistics.median(per_round[v]) for v in VARIANTS},
        "median_per_round_ratio": statistics.median(
            b / a for a, b in zip(per_round["padded"], per_round["packed"], strict=True)
        ),
        "pad_frac": {v: 1 - tokens / pos[v] for v in VARIANTS},
        "positions_ratio": pos["packed"] / pos["padded"],
        "per_round_s": per_round,
        "micro_batches": shape,
    }


def render_markdown(result: dict[str, Any]) -> str:
    """The README table of a result JSON."""
    med = result["median_s"]
    rows = [
        [v, f"{result['pad_frac'][v]:.1%}", f"{med[v]:.2f}", f"{med[v] / med['padded']:.2f}"]
        for v in VARIANTS
    ]
    text = table(["micro-batch rows", "padding", "s/step", "× padded"], rows, align="lrrr")
    s = result["setup"]
    n = len(result["micro_batches"])
    note = (
        f"{s['samples_per_micro_batch']} demo samples per micro-batch, {n} micro-batches; packed rows "
        f"compute {result['positions_ratio']:.2f}× the positions of padded rows; median per-round "
        f"time ratio {result['median_per_round_ratio']:.2f}; per-task losses and gradients equal "
        f"(largest relative gradient difference {result['max_relative_grad_diff']:.1e})."
    )
    return text + "\n\n" + paragraph(note)


def arguments(p: argparse.ArgumentParser) -> None:
    """`--data`: the tokenized tasks."""
    p.add_argument("--data", type=Path, default=DATA, help=f"tokenized tasks (default {DATA})")


MODE = cli.Mode(CLI, run, render_markdown, arguments=arguments, help="packed against padded micro-batches")
