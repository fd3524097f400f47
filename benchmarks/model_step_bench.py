"""One training step of the real SmolLM2-135M-Instruct: mtmoe's MoE-LoRA against a plain PEFT LoRA.

Forward + backward, fp32, one CPU thread, batch 4 x 128 tokens of which ~25% carry loss (a fixed,
seeded random mask; position 0 never does, it has nothing to predict it). Gradients are cleared before
every step; there is no optimizer step (an AdamW update of 3-6 M parameters, small next to the step).

Variants:
    peft_lora_r16: the baseline a user would pick instead. PEFT `LoraConfig(r=16, lora_alpha=32,
        target_modules=["gate_proj", "up_proj", "down_proj"])` on the base model; loss is the standard
        HF causal-LM loss, `model(input_ids=..., labels=...)` with labels -100 off the mask (plus the
        all-ones attention mask and `use_cache=False`, as mtmoe's forward passes them).
    mtmoe_moe_lora: `mtmoe.model.moe_lm.build_model` with `launch/recipes/demo.yaml` (4 experts, top-2,
        rank 8 on all 30 FFNs); `loss_BS, aux = model(...)`, loss = loss_BS.sum() / mask.sum() + 0.01 * aux.
        The LM head runs only at the positions that predict a target.
    mtmoe_moe_lora_full_head: the same model (the same module object), but the full-vocabulary logits
        from `model.lm(...)` and `mtmoe.model.token_loss.token_losses`: what the target-only LM head
        saves.
    loop_moe_lora: the same model and parameters, each MoE block computed the way most LoRA-MoE code
        runs today (MixLoRA-style, HF's per-expert loop): per expert, gather its tokens, run the frozen
        gate/up/down on them plus that expert's LoRA paths, weight and scatter back. Each token pays the
        frozen FFN once per chosen expert; mtmoe pays it once.
    frozen_floor: the floor: the same frozen base (the same module, each block swapped back to its frozen
        FFN) with no adapters at all. The gradient starts at the output of the first adapted FFN (a forward
        hook makes it a leaf that requires grad), so the backward computes only input grads through every
        later layer, the part of a LoRA step's backward that no adapter design can avoid; the LM head runs
        only at the target positions, with the same tokens, loss mask and cross-entropy function as
        mtmoe's forward (`target_token_losses`).

Before timing, the script checks that the three variants compute the same objective: with the freshly
initialised adapters (LoRA B factors at zero) every model is the base model, so the three cross-entropy
losses must agree; then, with the B factors set to small random values, the two mtmoe variants must agree
in loss and in every gradient. The floor must give the base model's cross-entropy too, and its step must
leave every parameter without a gradient.

Timing is CPU time (`time.process_time`), so another job on another core does not count; variants are
interleaved in rounds (order rotated each round) and the median seconds per step per variant is reported,
with ratios to `peft_lora_r16` and to `frozen_floor` from the same run, and issue #8's targets (mtmoe /
PEFT <= 1.15, loop / mtmoe >= 1.5) judged on the ratio of medians. A step takes seconds; the defaults
(1 warm-up step, then the median of 8 rounds x 1 timed step, as issue #8 asks) keep the full run near
5 minutes; `--rounds`, `--iters`, `--warmup` override. `render_markdown` gives the README table of a
result JSON (`--render PATH` prints it without running anything).

Run (from the repository root; the base model is the cached HF folder under .cache/):
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/model_step_bench.py          # full
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/model_step_bench.py --quick  # prints
    ... --quick --tiny   # the smoke test: the same code path on a tiny random Llama
    .venv/bin/python benchmarks/model_step_bench.py --render benchmarks/results/model_step_bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from bench_cli import TINY_OVERRIDES
from harness import (
    CliDefaults,
    Table,
    cli_main,
    machine_info,
    random_batch,
    summarize,
    time_rounds,
    timing_settings,
)
from peft import LoraConfig, get_peft_model
from torch import nn

from mtmoe.config import Config, load_config
from mtmoe.model.block import MoELoRAFFN
from mtmoe.model.moe_lm import MoELM, build_base, build_model
from mtmoe.model.token_loss import target_token_losses, token_losses

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "launch" / "recipes" / "demo.yaml"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "model_step_bench.json"
VOCAB = 49152
SETUP = {
    "batch": 4,
    "seq": 128,
    "loss_fraction": 0.25,
    "peft_lora": {"r": 16, "lora_alpha": 32, "target_modules": ["gate_proj", "up_proj", "down_proj"]},
    "recipe": "launch/recipes/demo.yaml",
}
BASELINE = "peft_lora_r16"
FLOOR = "frozen_floor"
MOE_VARIANTS = ("mtmoe_moe_lora", "mtmoe_moe_lora_full_head", "loop_moe_lora")
VARIANTS = (BASELINE, *MOE_VARIANTS, FLOOR)
# Issue #8's targets: (name, numerator, denominator, bound, "<=" or ">="), on the ratio of medians.
TARGETS = (
    ("mtmoe_over_peft", "mtmoe_moe_lora", BASELINE, 1.15, "<="),
    ("loop_over_mtmoe", "loop_moe_lora", "mtmoe_moe_lora", 1.5, ">="),
)
CLI = CliDefaults(rounds=8, iters=1, warmup=1, quick=(1, 1, 1), iter_name="steps", out=DEFAULT_OUT, tiny=True)
TABLE = Table(
    VARIANTS,
    header=f"{'variant':<26}{'median s':>10}{'x peft':>8}{'x floor':>9}{'tokens/s':>10}{'trainable':>12}",
    row=(
        "{name:<26}{median_s:>10.3f}{ratio_to_peft_lora_r16:>8.2f}{ratio_to_frozen_floor:>9.2f}"
        "{tokens_per_s:>10.1f}{trainable_params:>12,}"
    ),
)

# A variant's loss terms: (cross-entropy over the target tokens, router aux loss or None).
LossFn = Callable[[], tuple[torch.Tensor, torch.Tensor | None]]


def make_batch(seed: int) -> dict[str, torch.Tensor]:
    """Random tokens, no padding, a fixed random loss mask (~25%, never position 0), one task."""
    return random_batch(SETUP["batch"], SETUP["seq"], VOCAB, SETUP["loss_fraction"], seed)


def recipe(tiny: bool) -> Config:
    """The demo recipe, on a tiny random Llama when `tiny` (the smoke test)."""
    return load_config(RECIPE, list(TINY_OVERRIDES) if tiny else [])


def build_peft(cfg: Config) -> nn.Module:
    """The recipe's base model with one plain rank-16 LoRA on every FFN projection."""
    base = build_base(cfg, VOCAB)
    lora = SETUP["peft_lora"]
    return get_peft_model(
        base, LoraConfig(r=lora["r"], lora_alpha=lora["lora_alpha"], target_modules=lora["target_modules"])
    ).train()


def build_mtmoe(cfg: Config) -> tuple[MoELM, float]:
    """The recipe's mtmoe model (its own copy of the base) and the recipe's aux-loss coefficient."""
    return build_model(cfg, VOCAB, num_tasks=1).train(), cfg.moe.aux_loss_coef


def loss_fns(peft_model: nn.Module, moe: MoELM, batch: dict[str, torch.Tensor]) -> dict[str, LossFn]:
    """Each variant's loss terms on `batch`."""
    ids, attn, mask, task_ids = (batch[k] for k in ("input_ids", "attention_mask", "loss_mask", "task_ids"))
    n_targets = mask.sum()

    def peft_terms() -> tuple[torch.Tensor, None]:
        out = peft_model(input_ids=ids, attention_mask=attn, labels=batch["labels"], use_cache=False)
        return out.loss, None

    def moe_terms() -> tuple[torch.Tensor, torch.Tensor]:
        loss_BS, aux = moe(ids, attn, mask, task_ids)
        return loss_BS.sum() / n_targets, aux

    def moe_full_head_terms() -> tuple[torch.Tensor, torch.Tensor]:
        # The model's own routed forward, then logits at every position.
        hidden_BSD, aux = moe.hidden_states(ids, attn, task_ids)
        loss_BS = token_losses(moe.lm.get_output_embeddings()(hidden_BSD), ids, mask)
        return loss_BS.sum() / n_targets, aux

    def loop_terms() -> tuple[torch.Tensor, torch.Tensor]:
        layers = moe.lm.model.layers
        blocks = {i: layer.mlp for i, layer in enumerate(layers) if isinstance(layer.mlp, MoELoRAFFN)}
        for i, block in blocks.items():
            layers[i].mlp = LoopMoELoRAFFN(block)
        try:
            return moe_terms()
        finally:  # autograd keeps what it needs; the model goes back to mtmoe's blocks
            for i, block in blocks.items():
                layers[i].mlp = block

    def floor_terms() -> tuple[torch.Tensor, None]:
        return frozen_floor_loss(moe, batch), None

    terms = (peft_terms, moe_terms, moe_full_head_terms, loop_terms, floor_terms)
    return dict(zip(VARIANTS, terms, strict=True))


def _grad_starts_here(module: nn.Module, args: tuple, out_BSD: torch.Tensor) -> torch.Tensor:
    """Forward hook: the module's output as a leaf that requires grad (where grad is enabled)."""
    return out_BSD.detach().requires_grad_(torch.is_grad_enabled())


def frozen_floor_loss(moe: MoELM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The frozen base's mean target cross-entropy, differentiable from the first adapted FFN's output on.

    Each MoE block is swapped back to its frozen FFN for the call (no router, no adapters); a hook on the
    first of them makes its output a leaf that requires grad, so the backward of the result computes the
    input grads of every later layer and nothing else (every weight is frozen).

    Args:
        moe: The mtmoe model; its blocks are restored before returning.
        batch: The batch (`input_ids`, `attention_mask`, `loss_mask`).

    Returns:
        The scalar loss, summed target-token cross-entropy over the number of loss-mask tokens.
    """
    ids_BS, attn_BS, mask_BS = (batch[k] for k in ("input_ids", "attention_mask", "loss_mask"))
    layers = moe.lm.model.layers
    blocks = {i: layer.mlp for i, layer in enumerate(layers) if isinstance(layer.mlp, MoELoRAFFN)}
    for i, block in blocks.items():
        layers[i].mlp = block.base
    hook = layers[min(blocks)].mlp.register_forward_hook(_grad_starts_here)
    try:
        hidden_BSD = moe.lm.base_model(input_ids=ids_BS, attention_mask=attn_BS, use_cache=False)[0]
        head = moe.lm.get_output_embeddings()
        loss_BS = target_token_losses(hidden_BSD, head, ids_BS, mask_BS)
        return loss_BS.sum() / mask_BS.sum()
    finally:
        hook.remove()
        for i, block in blocks.items():
            layers[i].mlp = block


class LoopMoELoRAFFN(nn.Module):
    """An `MoELoRAFFN`'s function, computed with a Python loop over experts (the usual LoRA-MoE code).

    Shares the block's router, frozen FFN and LoRA factors; reports the router loss to the same context.
    """

    def __init__(self, block: MoELoRAFFN):
        super().__init__()
        self.block = block

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        """Per expert: its tokens through W x + s·(x A_e) B_e on gate, up and down, weighted, summed."""
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        blk = self.block
        ctx, base, ex = blk.context, blk.base, blk.experts
        route = blk.router(x_TD, ctx.valid_T, ctx.task_T)
        ctx.add_route(route)
        out_TD = torch.zeros_like(x_TD)
        for e in range(blk.num_experts):
            tok_M, slot_M = (route.ids_TK == e).nonzero(as_tuple=True)
            if tok_M.numel() == 0:
                continue
            x_MD = x_TD.index_select(0, tok_M)

            def lora(proj: str, v: torch.Tensor, e: int = e) -> torch.Tensor:
                a, b = ex.factors(proj)
                return (v @ a[e]) @ b[e] * ex.scaling

            h_MF = F.silu(base.gate_proj(x_MD) + lora("gate", x_MD)) * (base.up_proj(x_MD) + lora("up", x_MD))
            y_MD = (base.down_proj(h_MF) + lora("down", h_MF)) * route.weights_TK[tok_M, slot_M, None]
            out_TD = out_TD.index_add(0, tok_M, y_MD)
        return out_TD.reshape(B, S, D)


def trainable(module: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def make_step(terms: LossFn, params: list[nn.Parameter], aux_coef: float) -> Callable[[], torch.Tensor]:
    """One training step without the optimizer: clear grads, forward, backward; returns the loss."""

    def step() -> torch.Tensor:
        for p in params:
            p.grad = None
        ce, aux = terms()
        loss = ce if aux is None else ce + aux  # the router loss comes weighted
        loss.backward()
        return loss.detach()

    return step


def perturb_lora_b(module: nn.Module, seed: int) -> None:
    """B factors start at zero (the adapted model is the base); give them small random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in trainable(module).items():
            if name.endswith("_b") or ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def check_floor_frozen(floor: LossFn, moe: MoELM) -> None:
    """Asserts that the floor's step backpropagates and leaves every parameter without a gradient."""
    loss = make_step(floor, [], 0.0)()
    assert torch.isfinite(loss), "frozen_floor: non-finite loss"
    with_grad = [n for n, p in moe.named_parameters() if p.grad is not None]
    assert not with_grad, f"frozen_floor: parameters got gradients: {with_grad[:3]}"


def check_objective(
    fns: dict[str, LossFn], peft_model: nn.Module, moe: MoELM, aux_coef: float, seed: int
) -> dict:
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
        loss = make_step(fns[n], list(params.values()), aux_coef)()
        runs[n] = (loss, {k: p.grad.clone() for k, p in params.items()})
    for p in [*params.values(), *trainable(peft_model).values()]:
        p.grad = None
    (loss_t, g_t), (loss_f, g_f) = runs["mtmoe_moe_lora"], runs["mtmoe_moe_lora_full_head"]
    torch.testing.assert_close(loss_t, loss_f, atol=1e-5, rtol=1e-5)
    for k in params:
        torch.testing.assert_close(g_t[k], g_f[k], atol=1e-5, rtol=1e-3, msg=k)
    loss_l, g_l = runs["loop_moe_lora"]
    torch.testing.assert_close(loss_l, loss_t, atol=1e-5, rtol=1e-5)
    for k in params:
        torch.testing.assert_close(g_l[k], g_t[k], atol=1e-5, rtol=1e-3, msg=k)
    check_floor_frozen(fns[FLOOR], moe)
    return {
        "init_cross_entropy": ce_init,
        "adapted_loss_target_head_vs_full_head": [loss_t.item(), loss_f.item()],
        "adapted_param_grad_max_abs_diff": max((g_t[k] - g_f[k]).abs().max().item() for k in params),
        "param_grads_checked": len(params),
    }


def objective_line(result: dict) -> str:
    obj = result["objective_check"]
    ce = ", ".join(f"{v:.5f}" for v in obj["init_cross_entropy"].values())
    return (
        f"same objective: initial cross-entropy {ce}; adapted mtmoe target vs full head: "
        f"grads max |diff| {obj['adapted_param_grad_max_abs_diff']:.2e}; "
        f"mtmoe {result['ratio_to_frozen_floor']['mtmoe_moe_lora']:.2f}x the frozen floor; "
        + "; ".join(f"{n} {t['value']:.2f} {t['bound']} met={t['met']}" for n, t in result["targets"].items())
    )


def judge_targets(median_s: Mapping[str, float]) -> dict[str, dict[str, Any]]:
    """Issue #8's targets on the ratio of medians: value, bound (as text) and whether it is met."""
    out = {}
    for name, num, den, bound, op in TARGETS:
        value = median_s[num] / median_s[den]
        met = value <= bound if op == "<=" else value >= bound
        out[name] = {"value": value, "numerator": num, "denominator": den, "bound": f"{op} {bound}"}
        out[name]["met"] = met
    return out


def run(rounds: int, iters: int, warmup: int, seed: int = 0, tiny: bool = False) -> dict:
    """Builds, checks and times the variants; returns the result record."""
    torch.set_num_threads(1)
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    cfg = recipe(tiny)
    peft_model = build_peft(cfg)
    moe, aux_coef = build_mtmoe(cfg)
    load_s = time.perf_counter() - t0
    batch = make_batch(seed)
    fns = loss_fns(peft_model, moe, batch)
    objective = check_objective(fns, peft_model, moe, aux_coef, seed)

    params = {BASELINE: trainable(peft_model), **{n: trainable(moe) for n in MOE_VARIANTS}, FLOOR: {}}
    steps = {n: make_step(fns[n], list(params[n].values()), aux_coef) for n in VARIANTS}
    per_round_s = time_rounds(steps, rounds, iters, warmup)

    # median_s, ratio_to_peft_lora_r16, median_per_round_ratio_to_peft_lora_r16, and the same to the floor
    summary = summarize(per_round_s, BASELINE, "s")
    floor_summary = summarize(per_round_s, FLOOR, "s")
    del floor_summary["median_s"]
    median_s = summary["median_s"]
    tokens = SETUP["batch"] * SETUP["seq"]
    return {
        "benchmark": f"{'tiny random Llama (smoke test)' if tiny else 'SmolLM2-135M-Instruct'} training step "
        "(forward + backward), fp32, CPU",
        "machine": {**machine_info(), "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
        "setup": {
            **SETUP,
            "tokens": tokens,
            "target_tokens": int(batch["loss_mask"].sum()),
            "aux_loss_coef": aux_coef,
            "moe": moe_setup(moe),
            "dtype": "float32",
            "seed": seed,
            "tiny": tiny,
        },
        "timing": {**timing_settings(rounds, iters, warmup), "model_load_wall_s": load_s},
        "trainable_params": {n: sum(p.numel() for p in params[n].values()) for n in VARIANTS},
        "objective_check": objective,
        **summary,
        **floor_summary,
        "targets": judge_targets(median_s),
        "tokens_per_s": {n: tokens / median_s[n] for n in VARIANTS},
        "per_round_s": per_round_s,
    }


def moe_setup(moe: MoELM) -> dict[str, int]:
    """The MoE-LoRA shape the table describes: blocks, experts, top-k and rank."""
    blocks = [m for m in moe.modules() if isinstance(m, MoELoRAFFN)]
    first = blocks[0]
    return {
        "blocks": len(blocks),
        "layers": len(moe.lm.model.layers),
        "num_experts": first.num_experts,
        "top_k": first.router.top_k,
        "rank": first.experts.gate_a.shape[2],
    }


def variant_labels(result: Mapping[str, Any]) -> dict[str, str]:
    """The README's description of each variant, from the result's setup."""
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
    """The README table of a result record: the variants, the ratio to the floor and issue #8's targets.

    A pure function of the record (as `run` returns it or as read back from the JSON).
    """
    median, to_floor = result["median_s"], result[f"ratio_to_{FLOOR}"]
    to_peft = result[f"ratio_to_{BASELINE}"]
    labels = variant_labels(result)
    lines = ["| variant | s/step | × PEFT |", "|---|---:|---:|"]
    for name in (FLOOR, BASELINE, *MOE_VARIANTS):
        ratio = f"**{to_peft[name]:.2f}**" if name == "mtmoe_moe_lora" else f"{to_peft[name]:.2f}"
        lines.append(f"| {labels[name]} | {median[name]:.2f} | {ratio} |")
    per_round = result[f"median_per_round_ratio_to_{FLOOR}"]["mtmoe_moe_lora"]
    lines += [
        "",
        f"mtmoe's step costs **{to_floor['mtmoe_moe_lora']:.2f}×** the floor (median of per-round ratios "
        f"{per_round:.2f}); PEFT LoRA costs {to_floor[BASELINE]:.2f}× it.",
        "",
        "| target (issue #8) | ratio of medians | bound | met |",
        "|---|---:|---:|---|",
    ]
    names = {"mtmoe_over_peft": "mtmoe ÷ PEFT LoRA", "loop_over_mtmoe": "per-expert loop ÷ mtmoe"}
    for key, t in result["targets"].items():
        bound = t["bound"].replace("<=", "≤").replace(">=", "≥")
        met = "yes" if t["met"] else "no"
        lines.append(f"| {names.get(key, key)} | {t['value']:.2f} | {bound} | {met} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Runs the benchmark (see the module docstring), or with `--render PATH` only prints a JSON's table."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--render", type=Path, default=None)
    known, rest = pre.parse_known_args(argv)
    if known.render is not None:
        result = json.loads(known.render.read_text())
        print(render_markdown(result))
        return result
    result = cli_main(__doc__.splitlines()[0], rest, CLI, run, TABLE, objective_line)
    print(render_markdown(result))
    return result


if __name__ == "__main__":
    main()
