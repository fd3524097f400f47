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
        from `model.lm(...)` and `mtmoe.balance.task_loss.token_losses`: what the target-only LM head
        saves.
    loop_moe_lora: the same model and parameters, each MoE block computed the way most LoRA-MoE code
        runs today (MixLoRA-style, HF's per-expert loop): per expert, gather its tokens, run the frozen
        gate/up/down on them plus that expert's LoRA paths, weight and scatter back. Each token pays the
        frozen FFN once per chosen expert; mtmoe pays it once.

Before timing, the script checks that the three variants compute the same objective: with the freshly
initialised adapters (LoRA B factors at zero) every model is the base model, so the three cross-entropy
losses must agree; then, with the B factors set to small random values, the two mtmoe variants must agree
in loss and in every gradient.

Timing is CPU time (`time.process_time`), so another job on another core does not count; variants are
interleaved in rounds (order rotated each round) and the median seconds per step per variant is reported,
with ratios to `peft_lora_r16` from the same run. A step takes seconds, so the defaults (1 warm-up step,
5 rounds x 1 timed step) keep the full run near 2.5 minutes; `--rounds`, `--iters`, `--warmup` override.

Run (from the repository root; the base model is the cached HF folder under .cache/):
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/model_step_bench.py          # full
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/model_step_bench.py --quick  # prints
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from harness import CliDefaults, Table, cli_main, machine_info, summarize, time_rounds, timing_settings
from peft import LoraConfig, get_peft_model
from torch import nn

from mtmoe.balance.task_loss import token_losses
from mtmoe.config import load_config
from mtmoe.model.base import ensure_smollm2, load_base_model
from mtmoe.model.block import MoELoRAFFN
from mtmoe.model.moe_lm import MoELM, build_model

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
VARIANTS = (BASELINE, "mtmoe_moe_lora", "mtmoe_moe_lora_full_head", "loop_moe_lora")
CLI = CliDefaults(rounds=5, iters=1, warmup=1, quick=(1, 1, 1), iter_name="steps", out=DEFAULT_OUT)
TABLE = Table(
    VARIANTS,
    header=f"{'variant':<26}{'median s':>10}{'x peft':>8}{'tokens/s':>10}{'trainable':>12}",
    row="{name:<26}{median_s:>10.3f}{ratio_to_peft_lora_r16:>8.2f}{tokens_per_s:>10.1f}{trainable_params:>12,}",
)

# A variant's loss terms: (cross-entropy over the target tokens, router aux loss or None).
LossFn = Callable[[], tuple[torch.Tensor, torch.Tensor | None]]


def make_batch(seed: int) -> dict[str, torch.Tensor]:
    """Random tokens, no padding, a fixed random loss mask (~25%, never position 0), one task."""
    B, S = SETUP["batch"], SETUP["seq"]
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (B, S), generator=gen)
    loss_mask = (torch.rand(B, S, generator=gen) < SETUP["loss_fraction"]).long()
    loss_mask[:, 0] = 0
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones(B, S, dtype=torch.long),
        "loss_mask": loss_mask,
        "labels": torch.where(loss_mask.bool(), input_ids, torch.full_like(input_ids, -100)),
        "task_ids": torch.zeros(B, dtype=torch.long),
    }


def build_peft() -> nn.Module:
    """The base model with one plain rank-16 LoRA on every FFN projection."""
    base = load_base_model(ensure_smollm2())
    lora = SETUP["peft_lora"]
    return get_peft_model(
        base, LoraConfig(r=lora["r"], lora_alpha=lora["lora_alpha"], target_modules=lora["target_modules"])
    ).train()


def build_mtmoe() -> tuple[MoELM, float]:
    """The demo recipe's mtmoe model (its own copy of the base) and the recipe's aux-loss coefficient."""
    cfg = load_config(RECIPE)
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
        # Sets the routing context as `MoELM.forward` does, but computes logits at every position.
        ctx = moe.context
        ctx.valid_T = attn.reshape(-1).bool()
        ctx.task_T = task_ids[:, None].expand_as(ids).reshape(-1)
        ctx.aux_losses = []
        logits_BSV = moe.lm(input_ids=ids, attention_mask=attn, use_cache=False).logits
        loss_BS = token_losses(logits_BSV, ids, mask)
        aux = torch.stack(ctx.aux_losses).mean()
        ctx.aux_losses, ctx.valid_T, ctx.task_T = [], None, None
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

    return dict(zip(VARIANTS, (peft_terms, moe_terms, moe_full_head_terms, loop_terms), strict=True))


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
    for n in VARIANTS[1:]:
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
        f"grads max |diff| {obj['adapted_param_grad_max_abs_diff']:.2e}"
    )


def run(rounds: int, iters: int, warmup: int, seed: int = 0) -> dict:
    """Builds, checks and times the variants; returns the result record."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    peft_model = build_peft()
    moe, aux_coef = build_mtmoe()
    load_s = time.perf_counter() - t0
    batch = make_batch(seed)
    fns = loss_fns(peft_model, moe, batch)
    objective = check_objective(fns, peft_model, moe, aux_coef, seed)

    params = {BASELINE: trainable(peft_model), **{n: trainable(moe) for n in VARIANTS[1:]}}
    steps = {n: make_step(fns[n], list(params[n].values()), aux_coef) for n in VARIANTS}
    per_round_s = time_rounds(steps, rounds, iters, warmup)

    # median_s, ratio_to_peft_lora_r16, median_per_round_ratio_to_peft_lora_r16
    summary = summarize(per_round_s, BASELINE, "s")
    median_s = summary["median_s"]
    tokens = SETUP["batch"] * SETUP["seq"]
    return {
        "benchmark": "SmolLM2-135M-Instruct training step (forward + backward), fp32, CPU",
        "machine": machine_info(),
        "setup": {
            **SETUP,
            "tokens": tokens,
            "target_tokens": int(batch["loss_mask"].sum()),
            "aux_loss_coef": aux_coef,
            "dtype": "float32",
            "seed": seed,
        },
        "timing": {**timing_settings(rounds, iters, warmup), "model_load_wall_s": load_s},
        "trainable_params": {n: sum(p.numel() for p in params[n].values()) for n in VARIANTS},
        "objective_check": objective,
        **summary,
        "tokens_per_s": {n: tokens / median_s[n] for n in VARIANTS},
        "per_round_s": per_round_s,
    }


def main(argv: list[str] | None = None) -> dict:
    return cli_main(__doc__.splitlines()[0], argv, CLI, run, TABLE, objective_line)


if __name__ == "__main__":
    main()
