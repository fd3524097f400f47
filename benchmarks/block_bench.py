"""Micro-benchmark of one MoE-LoRA FFN block against the dense FFN, a plain LoRA and a naive MoE-LoRA.

Forward + backward, fp32, one CPU thread, at SmolLM2-135M's FFN shape. Every variant gets an input
that requires grad and a real random output grad; only LoRA factors and the router are trainable.

Variants:
    dense: the frozen SwiGLU FFN alone (input grad only) — the baseline.
    peft_style_lora: the frozen FFN with one plain rank-16 LoRA on gate, up and down.
    mtmoe_block: `MoELoRAFFN` (shared base FFN, grouped_mm dispatch of the LoRA paths).
    naive_moe: per expert, the tokens routed to it go through a full FFN with W + ΔW_e; the
        gate-weighted outputs are summed back.

Timing is CPU time (`time.process_time`), so another job on another core does not count; variants are
interleaved in rounds (order rotated each round) and the median per-iteration time per variant is
reported, with ratios to `dense` from the same run.

Run:
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/block_bench.py           # full, writes JSON
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/block_bench.py --quick   # short, prints only
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from harness import CliDefaults, Table, cli_main, machine_info, summarize, time_rounds, timing_settings
from md_tables import bold_if, paragraph, table
from torch import nn

from mtmoe.model.block import MoELoRAFFN, RoutingContext
from mtmoe.model.experts import UpcycledLoRAExperts
from mtmoe.model.lora import LoRALinear
from mtmoe.model.routers import TopKRouter

# SmolLM2-135M FFN shape; batch 4 x 128 tokens.
SHAPES = {
    "batch": 4,
    "seq": 128,
    "hidden": 576,
    "ffn": 1536,
    "experts": 4,
    "top_k": 2,
    "moe_rank": 8,
    "moe_alpha": 16.0,
    "lora_rank": 16,
    "lora_alpha": 32.0,
}
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "block_bench.json"
VARIANTS = ("dense", "peft_style_lora", "mtmoe_block", "naive_moe")
CLI = CliDefaults(rounds=7, iters=5, warmup=3, quick=(2, 1, 1), iter_name="iterations", out=DEFAULT_OUT)
TABLE = Table(
    VARIANTS,
    header=f"{'variant':<18}{'median ms':>11}{'x dense':>9}{'trainable':>11}",
    row="{name:<18}{median_ms:>11.1f}{ratio_to_dense:>9.2f}{trainable_params:>11,}",
)
# The README's row labels (formatted with the shapes); the mtmoe row's ratio is bold.
README_LABELS = {
    "dense": "dense frozen SwiGLU FFN (baseline)",
    "peft_style_lora": "plain LoRA r{lora_rank} on gate/up/down",
    "mtmoe_block": "**mtmoe MoE-LoRA block** (shared base, cache-blocked SwiGLU kernel)",
    "naive_moe": "naive MoE-LoRA (a full FFN with W+ΔW per expert)",
}
README_BOLD = "mtmoe_block"


class SwiGLU(nn.Module):
    """A Llama-style FFN: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, ffn_dim, bias=False)
        self.up_proj = nn.Linear(dim, ffn_dim, bias=False)
        self.down_proj = nn.Linear(ffn_dim, dim, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dense SwiGLU."""
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class PlainLoRAFFN(nn.Module):
    """The frozen FFN with one plain LoRA on each of gate, up and down (what a PEFT user would train)."""

    def __init__(self, base: SwiGLU, rank: int, alpha: float):
        super().__init__()
        self.gate_proj = LoRALinear(base.gate_proj, rank, alpha)
        self.up_proj = LoRALinear(base.up_proj, rank, alpha)
        self.down_proj = LoRALinear(base.down_proj, rank, alpha)
        self.act_fn = base.act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """SwiGLU with LoRA-adapted projections."""
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class NaiveMoELoRAFFN(nn.Module):
    """The obvious MoE-LoRA: expert e is a whole FFN with weights W + ΔW_e, run on its own tokens.

    Shares the router, base FFN and LoRA factors of an `MoELoRAFFN`, so both compute the same function;
    only the way of computing it differs (no shared-base identity: one full gate/up/down per expert).
    """

    def __init__(self, block: MoELoRAFFN):
        super().__init__()
        self.block = block

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        """Loops experts; each one gathers its tokens and runs a full FFN with its merged weights."""
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        base, experts, router = self.block.base, self.block.experts, self.block.router
        route = router(x_TD)
        merged = {
            proj: getattr(base, f"{proj}_proj").weight + experts.weight_delta(proj)  # (E, out, in)
            for proj in ("gate", "up", "down")
        }
        out_TD = x_TD.new_zeros(B * S, D)
        for e in range(router.num_experts):
            tok_M, slot_M = (route.ids_TK == e).nonzero(as_tuple=True)
            if tok_M.numel() == 0:
                continue
            x_MD = x_TD.index_select(0, tok_M)
            h_MF = F.silu(F.linear(x_MD, merged["gate"][e])) * F.linear(x_MD, merged["up"][e])
            y_MD = F.linear(h_MF, merged["down"][e]) * route.weights_TK[tok_M, slot_M, None]
            out_TD = out_TD.index_add(0, tok_M, y_MD)
        return out_TD.reshape(B, S, D)


def build_variants(seed: int = 0) -> dict[str, nn.Module]:
    """Builds the four variants around one shared frozen FFN."""
    s = SHAPES
    torch.manual_seed(seed)
    base = SwiGLU(s["hidden"], s["ffn"])
    base.requires_grad_(False)
    lora = PlainLoRAFFN(base, s["lora_rank"], s["lora_alpha"])
    block = MoELoRAFFN(
        base,
        TopKRouter(s["hidden"], s["experts"], s["top_k"]),
        UpcycledLoRAExperts(s["experts"], s["hidden"], s["ffn"], s["moe_rank"], s["moe_alpha"]),
        RoutingContext(),
    )
    with torch.no_grad():  # B factors start at zero; make the adapters non-trivial and the experts differ
        for name, p in [*lora.named_parameters(), *block.experts.named_parameters()]:
            if name.endswith("_b"):
                p.normal_(std=0.02)
    return {"dense": base, "peft_style_lora": lora, "mtmoe_block": block, "naive_moe": NaiveMoELoRAFFN(block)}


def trainable_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def make_step(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> Callable[[], None]:
    """One training-like step: clear grads, forward, backward with `grad_out`."""
    params = [p for p in module.parameters() if p.requires_grad]
    ctx = module.context if isinstance(module, MoELoRAFFN) else None

    def step() -> None:
        x.grad = None
        for p in params:
            p.grad = None
        if ctx is not None:
            ctx.aux_losses.clear()
        module(x).backward(grad_out)

    return step


def check_equivalence(fast: nn.Module, naive: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> dict:
    """Asserts the MoE block and the naive MoE agree in output and in every gradient."""
    results = {}
    for name, module in (("fast", fast), ("naive", naive)):
        xi = x.detach().clone().requires_grad_()
        module.zero_grad(set_to_none=True)
        out = module(xi)
        out.backward(grad_out)
        grads = {
            n.removeprefix("block."): p.grad.clone()
            for n, p in module.named_parameters()
            if p.grad is not None
        }
        results[name] = (out.detach(), xi.grad.clone(), grads)
    fast.zero_grad(set_to_none=True)
    fast.context.aux_losses.clear()
    (out_f, dx_f, g_f), (out_n, dx_n, g_n) = results["fast"], results["naive"]
    torch.testing.assert_close(out_f, out_n, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dx_f, dx_n, atol=1e-4, rtol=1e-4)
    assert g_f.keys() == g_n.keys(), (g_f.keys(), g_n.keys())
    for n in g_f:
        torch.testing.assert_close(g_f[n], g_n[n], atol=1e-4, rtol=1e-3, msg=n)
    return {
        "output_max_abs_diff": (out_f - out_n).abs().max().item(),
        "input_grad_max_abs_diff": (dx_f - dx_n).abs().max().item(),
        "param_grads_checked": sorted(g_f),
    }


def equivalence_line(result: dict) -> str:
    eq = result["equivalence_mtmoe_vs_naive"]
    return (
        f"mtmoe_block == naive_moe: output max |diff| {eq['output_max_abs_diff']:.2e} "
        f"(vs dense FFN: {eq['mtmoe_vs_dense_max_abs_diff']:.2e})"
    )


def run(rounds: int, iters: int, warmup: int, seed: int = 0) -> dict:
    """Builds, checks and times the variants; returns the result record."""
    torch.set_num_threads(1)
    s = SHAPES
    variants = build_variants(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(s["batch"], s["seq"], s["hidden"], generator=gen).requires_grad_()
    grad_out = torch.randn(s["batch"], s["seq"], s["hidden"], generator=gen)
    equivalence = check_equivalence(variants["mtmoe_block"], variants["naive_moe"], x, grad_out)
    with torch.no_grad():  # how far the adapted block is from the base: the check above is not vacuous
        equivalence["mtmoe_vs_dense_max_abs_diff"] = (
            (variants["mtmoe_block"](x) - variants["dense"](x)).abs().max().item()
        )
        variants["mtmoe_block"].context.aux_losses.clear()

    steps = {name: make_step(variants[name], x, grad_out) for name in VARIANTS}
    # One untimed step before each timed block, so each block starts warm.
    per_round_ms = time_rounds(steps, rounds, iters, warmup, scale=1e3, warm_step_per_round=True)
    return {
        "benchmark": "MoE-LoRA FFN block, forward + backward, fp32, CPU",
        "machine": machine_info(),
        "shapes": {**s, "tokens": s["batch"] * s["seq"], "dtype": "float32"},
        "timing": timing_settings(rounds, iters, warmup),
        "trainable_params": {n: trainable_params(m) for n, m in variants.items()},
        "equivalence_mtmoe_vs_naive": equivalence,
        # median_ms, ratio_to_dense, median_per_round_ratio_to_dense
        **summarize(per_round_ms, "dense", "ms"),
        "per_round_ms": per_round_ms,
    }


def render_markdown(result: dict) -> str:
    """The README's "One FFN block" caption and table, from a result record.

    Pure: no I/O and no timing. Every number comes from `result`.

    Args:
        result: The record `run` returns (as written to `results/block_bench.json`).

    Returns:
        The caption paragraph and the table: per variant, the median ms and the ratio to `dense`.
    """
    s, ms, ratio = result["shapes"], result["median_ms"], result["ratio_to_dense"]
    caption = paragraph(
        "**One FFN block** (`benchmarks/block_bench.py` → `benchmarks/results/block_bench.json`). "
        f"The shape is SmolLM2's FFN (D={s['hidden']}, F={s['ffn']}, {s['batch']} × {s['seq']} tokens), "
        f"with {s['experts']} experts, top-{s['top_k']} and rank {s['moe_rank']}; medians of "
        f"{result['timing']['rounds']} interleaved rounds:"
    )
    rows = [
        [
            README_LABELS[name].format(**s),
            f"{ms[name]:.1f}",
            bold_if(f"{ratio[name]:.2f}", name == README_BOLD),
        ]
        for name in VARIANTS
    ]
    return caption + "\n\n" + table(["variant", "ms", "× dense FFN"], rows, "lrr")


def main(argv: list[str] | None = None) -> dict:
    return cli_main(__doc__.splitlines()[0], argv, CLI, run, TABLE, equivalence_line)


if __name__ == "__main__":
    main()
