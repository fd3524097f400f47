"""The `compare` mode: one training step of SmolLM2-135M, mtmoe against PEFT LoRA, a loop and the floor.

Forward + backward, fp32, one thread, 4 x 128 tokens with ~25% carrying loss; grads cleared, no optimizer
step. The variants compute the same objective, asserted before timing: with fresh adapters every loss
is the base's cross-entropy; with random LoRA B factors the three MoE-LoRA variants agree in loss and
every gradient; the floor's step leaves every parameter without a gradient. Issue #8's targets are
judged on the ratio of medians.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from benchmarks import cli
from benchmarks.harness import machine_info, ratios, summarize, time_rounds, timing_settings
from benchmarks.models import PEFT_LORA, build_mtmoe, build_peft, perturb_lora_b, recipe, trainable
from benchmarks.step.common import (
    SETUP,
    LossFn,
    check_floor_frozen,
    loss_fns,
    make_batch,
    make_step,
    moe_setup,
)
from benchmarks.tables import bold_if, table
from mtmoe.model.moe_lm import MoELM
from mtmoe.model.routers import router_options

BASELINE = "peft_lora_r16"
FLOOR = "frozen_floor"
MOE_VARIANTS = ("mtmoe_moe_lora", "mtmoe_moe_lora_full_head", "loop_moe_lora")
VARIANTS = (BASELINE, *MOE_VARIANTS, FLOOR)
# Each variant's loss terms in `common.loss_fns`.
TERMS = dict(zip(VARIANTS, ("peft", "mtmoe", "full_head", "loop", "floor"), strict=True))
# Issue #8's targets: (name, numerator, denominator, bound, "<=" or ">="), on the ratio of medians.
TARGETS = (
    ("mtmoe_over_peft", "mtmoe_moe_lora", BASELINE, 1.15, "<="),
    ("loop_over_mtmoe", "loop_moe_lora", "mtmoe_moe_lora", 1.5, ">="),
)
CLI = cli.CliDefaults(cli.RESULTS / "step.json", rounds=8, iters=1, warmup=1, quick=(1, 1, 1), tiny=True)


def check_objective(fns: dict[str, LossFn], peft_model: nn.Module, moe: MoELM, seed: int) -> dict[str, Any]:
    """Asserts that the variants compute the same objective (see the module docstring).

    Leaves the LoRA B factors of both models at small random values and every grad cleared.
    """
    with torch.no_grad():
        ce_init = {n: fns[n]()[0].item() for n in VARIANTS}
    for n in VARIANTS[1:]:
        torch.testing.assert_close(ce_init[n], ce_init[BASELINE], atol=1e-4, rtol=1e-5, msg=n)

    perturb_lora_b(peft_model, seed)
    perturb_lora_b(moe, seed + 1)
    params = trainable(moe)
    runs = {}
    for n in MOE_VARIANTS:
        loss = make_step(fns[n], list(params.values()))()
        runs[n] = (loss, {k: p.grad.clone() for k, p in params.items()})
    for p in [*params.values(), *trainable(peft_model).values()]:
        p.grad = None
    loss_t, g_t = runs["mtmoe_moe_lora"]
    for other in ("mtmoe_moe_lora_full_head", "loop_moe_lora"):
        loss_o, g_o = runs[other]
        torch.testing.assert_close(loss_o, loss_t, atol=1e-5, rtol=1e-5)
        for k in params:
            torch.testing.assert_close(g_o[k], g_t[k], atol=1e-5, rtol=1e-3, msg=k)
    check_floor_frozen(fns[FLOOR], moe)
    g_f = runs["mtmoe_moe_lora_full_head"][1]
    return {
        "init_cross_entropy": ce_init,
        "adapted_loss_target_head_vs_full_head": [loss_t.item(), runs["mtmoe_moe_lora_full_head"][0].item()],
        "adapted_param_grad_max_abs_diff": max((g_t[k] - g_f[k]).abs().max().item() for k in params),
        "param_grads_checked": len(params),
    }


def judge_targets(median_s: Mapping[str, float]) -> dict[str, dict[str, Any]]:
    """Issue #8's targets on the ratio of medians: value, bound (as text) and whether it is met."""
    out = {}
    for name, num, den, bound, op in TARGETS:
        value = median_s[num] / median_s[den]
        met = value <= bound if op == "<=" else value >= bound
        out[name] = {
            "value": value,
            "numerator": num,
            "denominator": den,
            "bound": f"{op} {bound}",
            "met": met,
        }
    return out


def run(args: argparse.Namespace, seed: int = 0) -> dict[str, Any]:
    """Builds, checks and times the variants; returns the result record."""
    torch.set_num_threads(1)
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    cfg = recipe(args.tiny)
    peft_model, moe = build_peft(cfg), build_mtmoe(cfg)
    load_s = time.perf_counter() - t0
    batch = make_batch(seed)
    terms = loss_fns(moe, batch, peft_model)
    fns = {name: terms[key] for name, key in TERMS.items()}
    objective = check_objective(fns, peft_model, moe, seed)

    params = {BASELINE: trainable(peft_model), **{n: trainable(moe) for n in MOE_VARIANTS}, FLOOR: {}}
    steps = {n: make_step(fns[n], list(params[n].values())) for n in VARIANTS}
    per_round_s = time_rounds(steps, args.rounds, args.iters, args.warmup)
    summary = summarize(per_round_s, BASELINE, "s")
    median_s, tokens = summary["median_s"], SETUP["batch"] * SETUP["seq"]
    return {
        "benchmark": f"{'tiny random Llama (smoke test)' if args.tiny else 'SmolLM2-135M-Instruct'} training "
        "step (forward + backward), fp32, CPU",
        "machine": machine_info(loadavg_start=load_start, loadavg_end=os.getloadavg()),
        "setup": {
            **SETUP,
            "peft_lora": PEFT_LORA,
            "tokens": tokens,
            "target_tokens": int(batch["loss_mask"].sum()),
            "aux_loss_coef": router_options(cfg.moe).aux_loss_coef,
            "moe": moe_setup(moe),
            "dtype": "float32",
            "seed": seed,
            "tiny": args.tiny,
        },
        "timing": timing_settings(args.rounds, args.iters, args.warmup, model_load_wall_s=load_s),
        "trainable_params": {n: sum(p.numel() for p in params[n].values()) for n in VARIANTS},
        "objective_check": objective,
        **summary,  # median_s, and the ratios to PEFT, then to the floor
        **ratios(per_round_s, FLOOR),
        "targets": judge_targets(median_s),
        "tokens_per_s": {n: tokens / median_s[n] for n in VARIANTS},
        "per_round_s": per_round_s,
    }


def variant_labels(result: Mapping[str, Any]) -> dict[str, str]:
    """The docs' description of each variant, from the result's setup."""
    setup = result["setup"]
    lora, m = setup["peft_lora"], setup["moe"]
    where = f"all {m['blocks']} FFNs" if m["blocks"] == m["layers"] else f"{m['blocks']} FFNs"
    return {
        FLOOR: "the floor: the frozen base, no adapters (input grads only; LM head only at targets)",
        BASELINE: f"PEFT LoRA r{lora['r']} on gate/up/down (baseline; full-vocabulary head)",
        "mtmoe_moe_lora": (
            f"**mtmoe** {m['num_experts']} experts, top-{m['top_k']}, r{m['rank']} on {where} "
            "(LM head only at targets)"
        ),
        "mtmoe_moe_lora_full_head": "mtmoe with the full-vocabulary head",
        "loop_moe_lora": (
            "the same MoE-LoRA as a per-expert loop (MixLoRA/HF style: the frozen FFN once per chosen "
            "expert; LM head only at targets)"
        ),
    }


def render_markdown(result: Mapping[str, Any]) -> str:
    """The docs' table of a result record: the variants, the ratio to the floor and issue #8's targets."""
    median, to_floor = result["median_s"], result[f"ratio_to_{FLOOR}"]
    to_peft = result[f"ratio_to_{BASELINE}"]
    labels = variant_labels(result)
    variants = [
        [labels[n], f"{median[n]:.2f}", bold_if(f"{to_peft[n]:.2f}", n == "mtmoe_moe_lora")]
        for n in (FLOOR, BASELINE, *MOE_VARIANTS)
    ]
    per_round = result[f"median_per_round_ratio_to_{FLOOR}"]["mtmoe_moe_lora"]
    floor = (
        f"mtmoe's step costs **{to_floor['mtmoe_moe_lora']:.2f}×** the floor (median of per-round ratios "
        f"{per_round:.2f}); PEFT LoRA costs {to_floor[BASELINE]:.2f}× it."
    )
    names = {"mtmoe_over_peft": "mtmoe ÷ PEFT LoRA", "loop_over_mtmoe": "per-expert loop ÷ mtmoe"}
    targets = [
        [names.get(key, key), f"{t['value']:.2f}", t["bound"].replace("<=", "≤").replace(">=", "≥"),
         "yes" if t["met"] else "no"]
        for key, t in result["targets"].items()
    ]  # fmt: skip
    return "\n\n".join([
        table(["variant", "s/step", "× PEFT"], variants, "lrr"), floor,
        table(["target (issue #8)", "ratio of medians", "bound", "met"], targets, "lrrl"),
    ])  # fmt: skip


MODE = cli.Mode(CLI, run, render_markdown, help="mtmoe against PEFT LoRA, a loop and the floor")
