"""Micro-benchmark of the three expert families against the dense FFN and a plain LoRA, with router shares.

Forward + backward, fp32, one CPU thread, at SmolLM2-135M's FFN shape (D=576, F=1536, 4 x 128 tokens),
E=4 experts, rank 8 per expert. Every variant gets an input that requires grad and a real random output
grad; frozen weights stay frozen, only LoRA factors and routers train.

Variants:
    dense_ffn: the frozen SwiGLU FFN alone (input grad only).
    dense_lora_kr: the frozen FFN with one plain LoRA of rank K·r = 16 on gate, up and down — the
        baseline of the MoE-LoRA blocks (the same trainable rank per token).
    upcycled: `MoELoRAFFN`, 4 experts, top-2, rank 8.
    upcycled_router_dispatch: its router forward + backward (gate weights and the aux and z losses) and
        `dispatch()`, on the same tokens.
    upcycled_index_ops: the gathers (N rows of x, W1 x, W3 x) and combines (N rows of h and of ΔW2 h) of
        the composed path, standalone, forward + backward. The block's fast path runs them fused on
        cache-sized row blocks, so this is an upper bound of their share.
    moefied_soft: `MoEfiedFFN`, soft router over E=4 slices, rank 8 per slice (every slice runs).
    moefied_top1: `MoEfiedFFN`, top-1 of E=4 slices: a quarter of the neurons per token.
    moefied_top1_router_dispatch, moefied_top1_index_ops: as for upcycled (x gathered, N×D combined).
    native: `NativeMoELoRA` on a Mixtral block of E=4 experts, each a full SwiGLU of width F, top-2,
        rank 8 on every expert's gate, up and down. Each token runs two full-width experts, so its
        frozen work is about twice the dense FFN's; the fair comparisons are the next two.
    native_hf_frozen: HF's own `MixtralSparseMoeBlock` (the same weights), frozen, input grad only.
    native_hf_lora_loop: HF's computation with LoRA added the obvious way: a Python loop over the hit
        experts, each gathering its tokens and running W_e x + s (x A_e) B_e for gate, up and down (what
        PEFT does on per-expert linears).

Before timing the script asserts that each mtmoe variant computes what it should: upcycled equals a
naive per-expert FFN with W + ΔW_e (output and every grad); moefied soft with ω ≡ 1 equals the dense FFN
(fresh adapters) and the dense FFN with its LoRA folded in (random adapters); moefied top-1 equals its
dense path with ω the one-hot of the chosen slice; native equals HF's block with fresh adapters and the
LoRA loop with random ones (output and every grad).

Timing is CPU time (`time.process_time`), interleaved rounds with the order rotated each round, the
median per variant; ratios to `dense_lora_kr` and to `dense_ffn` from the same run. On the shared 2-core
machine a variant's time drifts by up to ±20% over the seconds between its turns in a round, so each
target is then timed on its own, paired: its variant and its baseline alternate one step each (rotated),
for `PAIRED_PER_ROUND` x rounds pairs, and the target is met when the median of the pairs' ratios is
within it. Both the paired ratio and the ratios of the main rounds are in the JSON.

Run:
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/family_bench.py           # full, writes JSON
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/family_bench.py --quick   # short, prints only
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from block_bench import NaiveMoELoRAFFN, PlainLoRAFFN, SwiGLU, check_equivalence, trainable_params
from harness import CliDefaults, Table, cli_main, machine_info, summarize, time_rounds, timing_settings
from md_tables import paragraph, table
from torch import nn
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from mtmoe.model.block import MoELoRAFFN
from mtmoe.model.dispatch import dispatch
from mtmoe.model.experts import UpcycledLoRAExperts
from mtmoe.model.moe_base import MoEBlock, RoutingContext
from mtmoe.model.moefied import MoEfiedFFN
from mtmoe.model.native import NativeMoELoRA
from mtmoe.model.routers import TopKRouter

SHAPES = {
    "batch": 4,
    "seq": 128,
    "hidden": 576,
    "ffn": 1536,
    "experts": 4,
    "top_k": 2,
    "rank": 8,
    "alpha": 16.0,
    "lora_rank": 16,  # K · rank
    "lora_alpha": 32.0,
    "native_expert_ffn": 1536,
    "native_top_k": 2,
}
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "family_bench.json"
VARIANTS = (
    "dense_ffn",
    "dense_lora_kr",
    "upcycled",
    "upcycled_router_dispatch",
    "upcycled_index_ops",
    "moefied_soft",
    "moefied_top1",
    "moefied_top1_router_dispatch",
    "moefied_top1_index_ops",
    "native",
    "native_hf_frozen",
    "native_hf_lora_loop",
)
# (name, variant, baseline, bound): met when the median paired ratio variant / baseline <= bound.
TARGETS = (
    ("upcycled_vs_dense_lora_kr", "upcycled", "dense_lora_kr", 1.15),
    ("moefied_top1_vs_dense_ffn", "moefied_top1", "dense_ffn", 0.5),
    ("upcycled_router_dispatch_share", "upcycled_router_dispatch", "upcycled", 0.15),
    ("moefied_top1_router_dispatch_share", "moefied_top1_router_dispatch", "moefied_top1", 0.15),
)
PAIRED_PER_ROUND = 3  # paired steps per target per main round
CLI = CliDefaults(rounds=12, iters=3, warmup=2, quick=(2, 1, 1), iter_name="iterations", out=DEFAULT_OUT)
TABLE = Table(
    VARIANTS,
    header=f"{'variant':<30}{'median ms':>11}{'x lora_kr':>11}{'x dense':>9}{'trainable':>11}",
    row="{name:<30}{median_ms:>11.1f}{ratio_to_dense_lora_kr:>11.2f}{ratio_to_dense_ffn:>9.2f}"
    "{trainable_params:>11,}",
)
# The README's variant rows, in order (labels formatted with the shapes); the names in bold are mtmoe's.
README_VARIANTS = {
    "dense_ffn": "dense frozen FFN",
    "dense_lora_kr": "dense FFN + LoRA rank k·r = {lora_rank} (baseline of the MoE-LoRA blocks)",
    "upcycled": "**upcycled**, top-{top_k}",
    "moefied_soft": "**MoEfied**, soft router (every slice)",
    "moefied_top1": "**MoEfied**, top-1 of {experts} slices",
    "native": "**native** Mixtral block ({experts} experts of width F, top-{native_top_k}) with LoRA",
    "native_hf_frozen": "HF `MixtralSparseMoeBlock`, frozen",
    "native_hf_lora_loop": "HF's per-expert loop with LoRA added",
}
README_TARGETS = {
    "upcycled_vs_dense_lora_kr": "upcycled ÷ dense LoRA r{lora_rank}",
    "moefied_top1_vs_dense_ffn": "MoEfied top-1 of {experts} ÷ dense FFN",
    "upcycled_router_dispatch_share": "router + dispatch, share of the upcycled block",
    "moefied_top1_router_dispatch_share": "router + dispatch, share of the MoEfied top-1 block",
}


def randomize_lora_b(*modules: nn.Module, std: float = 0.02) -> None:
    """LoRA B factors start at zero; make the adapters non-trivial and the experts differ."""
    with torch.no_grad():
        for module in modules:
            for name, p in module.named_parameters():
                if name.endswith(("_b", "lora_b")):
                    p.normal_(std=std)


class NativeLoRALoop(nn.Module):
    """HF's Mixtral expert loop with per-expert LoRA added the obvious way.

    Shares a `NativeMoELoRA`'s router, frozen experts and LoRA factors, so both compute the same function.
    """

    def __init__(self, block: NativeMoELoRA):
        super().__init__()
        self.block = block

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        """Loops the hit experts: gather tokens, frozen W_e plus LoRA per projection, weight, add back."""
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        blk, ex = self.block, self.block.experts
        route = blk.router(x_TD)
        out_TD = torch.zeros_like(x_TD)
        for e in route.ids_TK.unique().tolist():
            tok_M, slot_M = (route.ids_TK == e).nonzero(as_tuple=True)
            x_MD = x_TD[tok_M]
            gate_MF, up_MF = (x_MD @ blk.gate_up_LDG[e]).chunk(2, dim=-1)
            gate_MF = gate_MF + (x_MD @ ex.gate_a[e]) @ ex.gate_b[e] * ex.scaling
            up_MF = up_MF + (x_MD @ ex.up_a[e]) @ ex.up_b[e] * ex.scaling
            h_MF = blk.act_fn(gate_MF) * up_MF
            y_MD = h_MF @ blk.down_LFD[e] + (h_MF @ ex.down_a[e]) @ ex.down_b[e] * ex.scaling
            out_TD = out_TD.index_add(0, tok_M, y_MD * route.weights_TK[tok_M, slot_M, None])
        return out_TD.reshape(B, S, D)


def mixtral_block(seed: int) -> MixtralSparseMoeBlock:
    """A frozen, randomly initialised HF Mixtral block of E experts of width `native_expert_ffn`."""
    s = SHAPES
    config = MixtralConfig(
        hidden_size=s["hidden"],
        intermediate_size=s["native_expert_ffn"],
        num_local_experts=s["experts"],
        num_experts_per_tok=s["native_top_k"],
        hidden_act="silu",
    )
    torch.manual_seed(seed)
    block = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(std=0.02)
    return block.requires_grad_(False)


def build_variants(seed: int = 0) -> dict[str, nn.Module]:
    """The block variants (the router/index-op variants are built from them by `build_steps`)."""
    s = SHAPES
    torch.manual_seed(seed)
    base = SwiGLU(s["hidden"], s["ffn"]).requires_grad_(False)
    lora = PlainLoRAFFN(base, s["lora_rank"], s["lora_alpha"])
    upcycled = MoELoRAFFN(
        base,
        TopKRouter(s["hidden"], s["experts"], s["top_k"]),
        UpcycledLoRAExperts(s["experts"], s["hidden"], s["ffn"], s["rank"], s["alpha"]),
        RoutingContext(),
    )
    soft = MoEfiedFFN(base, s["experts"], 0, s["rank"], s["alpha"], RoutingContext())
    top1 = MoEfiedFFN(
        base, s["experts"], 1, s["rank"], s["alpha"], RoutingContext(), router=TopKRouter(s["hidden"], 4, 1)
    )
    hf = mixtral_block(seed + 2)
    native = NativeMoELoRA(hf, RoutingContext(), s["rank"], s["alpha"])
    return {
        "dense_ffn": base,
        "dense_lora_kr": lora,
        "upcycled": upcycled,
        "moefied_soft": soft,
        "moefied_top1": top1,
        "native": native,
        "native_hf_frozen": hf,
        "native_hf_lora_loop": NativeLoRALoop(native),
    }


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def forward_backward(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> tuple:
    """Output, input grad and parameter grads of one forward + backward (grads cleared after)."""
    xi = x.detach().clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    out = module(xi)
    out.backward(grad_out)
    grads = {
        n.removeprefix("block."): p.grad.clone() for n, p in module.named_parameters() if p.grad is not None
    }
    module.zero_grad(set_to_none=True)
    for m in module.modules():
        if isinstance(m, MoEBlock):
            m.context.aux_losses.clear()
    return out.detach(), xi.grad, grads


def check_families(v: dict[str, nn.Module], x: torch.Tensor, grad_out: torch.Tensor) -> dict:
    """Asserts each mtmoe variant computes what it should; randomizes the adapters for the timing."""
    checks = {}
    up = v["upcycled"]
    randomize_lora_b(v["dense_lora_kr"], up)
    checks["upcycled_vs_naive_per_expert_ffn"] = check_equivalence(up, NaiveMoELoRAFFN(up), x, grad_out)

    soft, dense = v["moefied_soft"], v["dense_ffn"]
    with torch.no_grad():  # fresh adapters and ω ≡ 1: exactly the dense FFN
        d_fresh = max_diff(soft(x), dense(x))
        randomize_lora_b(soft)
        d_folded = max_diff(soft(x), soft.to_dense_mlp()(x))  # ω ≡ 1 still (router weights zero)
    assert d_fresh < 1e-4 and d_folded < 1e-4, (d_fresh, d_folded)
    checks["moefied_soft_vs_dense"] = {"fresh_max_abs_diff": d_fresh, "lora_folded_max_abs_diff": d_folded}

    top1 = v["moefied_top1"]
    randomize_lora_b(top1)
    out_f, dx_f, _ = forward_backward(top1, x, grad_out)
    xi = x.detach().clone().requires_grad_()
    x_TD = xi.reshape(-1, SHAPES["hidden"])
    with torch.no_grad():
        ids_T1 = top1.router(x_TD).ids_TK
    omega_TE = torch.zeros(x_TD.shape[0], SHAPES["experts"]).scatter_(1, ids_T1, 1.0)
    out_d = top1.dense_forward(x_TD, omega_TE).reshape(x.shape)
    out_d.backward(grad_out)
    top1.zero_grad(set_to_none=True)
    assert max_diff(out_f, out_d) < 1e-4 and max_diff(dx_f, xi.grad) < 1e-4
    checks["moefied_top1_vs_dense_path_one_hot_omega"] = {
        "output_max_abs_diff": max_diff(out_f, out_d),
        "input_grad_max_abs_diff": max_diff(dx_f, xi.grad),
    }

    native, hf, loop = v["native"], v["native_hf_frozen"], v["native_hf_lora_loop"]
    with torch.no_grad():
        d_hf = max_diff(native(x), hf(x))
        native.context.aux_losses.clear()
    assert d_hf < 1e-5, d_hf
    randomize_lora_b(native)
    (out_n, dx_n, g_n), (out_l, dx_l, g_l) = (
        forward_backward(native, x, grad_out),
        forward_backward(loop, x, grad_out),
    )
    assert g_n.keys() == g_l.keys() and max_diff(out_n, out_l) < 1e-4 and max_diff(dx_n, dx_l) < 1e-4
    for n in g_n:
        torch.testing.assert_close(g_n[n], g_l[n], atol=1e-4, rtol=1e-3, msg=n)
    checks["native_vs_hf"] = {
        "fresh_vs_hf_block_max_abs_diff": d_hf,
        "vs_lora_loop_output_max_abs_diff": max_diff(out_n, out_l),
        "vs_lora_loop_input_grad_max_abs_diff": max_diff(dx_n, dx_l),
        "param_grads_checked": sorted(g_n),
    }
    return checks


def block_step(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> Callable[[], None]:
    """One training-like step: clear grads (and a block's router losses), forward, backward."""
    params = [p for p in module.parameters() if p.requires_grad]
    contexts = [m.context for m in module.modules() if isinstance(m, MoEBlock)]

    def step() -> None:
        x.grad = None
        for p in params:
            p.grad = None
        for ctx in contexts:
            ctx.aux_losses.clear()
        module(x).backward(grad_out)

    return step


def router_dispatch_step(router: TopKRouter, x_TD: torch.Tensor, num_experts: int) -> Callable[[], None]:
    """Router forward + `dispatch()` + the router's backward (gate weights with a random grad, aux, z)."""
    params = [p for p in router.parameters() if p.requires_grad]
    grad_TK = torch.randn(x_TD.shape[0], router.top_k, generator=torch.Generator().manual_seed(7))

    def step() -> None:
        x_TD.grad = None
        for p in params:
            p.grad = None
        route = router(x_TD)
        dispatch(route.ids_TK, route.weights_TK, num_experts)
        ((route.weights_TK * grad_TK).sum() + route.aux_loss + route.z_loss).backward()

    return step


def index_ops_step(router: TopKRouter, x_TD: torch.Tensor, wide: int | None) -> Callable[[], None]:
    """The composed path's gathers and combines at the block's shapes, forward + backward.

    Gathers N rows of x (and, when `wide` is given, of two T×wide tensors: W1 x and W3 x), and combines N
    rows of width D (and of width `wide`) back into the tokens, as `index_select` / `index_add` do.
    """
    with torch.no_grad():
        route = router(x_TD)
    d = dispatch(route.ids_TK, route.weights_TK, router.num_experts)
    T, D = x_TD.shape
    N, gen = d.token_N.shape[0], torch.Generator().manual_seed(8)
    x = x_TD.detach().clone().requires_grad_()
    tok_wide = [torch.randn(T, wide, generator=gen).requires_grad_() for _ in range(2)] if wide else []
    rows = [torch.randn(N, D, generator=gen).requires_grad_()]
    rows += [torch.randn(N, wide, generator=gen).requires_grad_()] if wide else []
    leaves = [x, *tok_wide, *rows]

    def step() -> None:
        for t in leaves:
            t.grad = None
        gathered = [t.index_select(0, d.token_N) for t in (x, *tok_wide)]
        combined = [r.new_zeros(T, r.shape[1]).index_add(0, d.token_N, r) for r in rows]
        outs = gathered + combined
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    return step


def build_steps(v: dict[str, nn.Module], x: torch.Tensor, grad_out: torch.Tensor) -> dict[str, Callable]:
    x_TD = x.detach().reshape(-1, SHAPES["hidden"]).clone().requires_grad_()
    up, top1 = v["upcycled"], v["moefied_top1"]
    steps = {name: block_step(m, x, grad_out) for name, m in v.items()}
    steps["upcycled_router_dispatch"] = router_dispatch_step(up.router, x_TD, SHAPES["experts"])
    steps["upcycled_index_ops"] = index_ops_step(up.router, x_TD, SHAPES["ffn"])
    steps["moefied_top1_router_dispatch"] = router_dispatch_step(top1.router, x_TD, SHAPES["experts"])
    steps["moefied_top1_index_ops"] = index_ops_step(top1.router, x_TD, None)
    return {name: steps[name] for name in VARIANTS}


def evaluate_targets(
    steps: dict[str, Callable[[], None]], per_round: dict[str, list[float]], pairs: int
) -> tuple[dict, dict]:
    """Times each target's variant and baseline paired (one step each, alternating); checks the bounds.

    Returns:
        Per target: the bound, the median paired ratio (what `met` tests), the paired median times, and
        the ratio of medians and median per-round ratio of the main rounds; and per target, met or not.
    """
    targets, met = {}, {}
    for name, variant, baseline, bound in TARGETS:
        paired = time_rounds({variant: steps[variant], baseline: steps[baseline]}, pairs, 1, 0, scale=1e3)
        ratios = [a / b for a, b in zip(paired[variant], paired[baseline], strict=True)]
        main = [a / b for a, b in zip(per_round[variant], per_round[baseline], strict=True)]
        targets[name] = {
            "variant": variant,
            "baseline": baseline,
            "max_ratio": bound,
            "ratio": statistics.median(ratios),
            "paired_pairs": pairs,
            "paired_median_ms": {k: statistics.median(v) for k, v in paired.items()},
            "main_rounds_ratio_of_medians": statistics.median(per_round[variant])
            / statistics.median(per_round[baseline]),
            "main_rounds_median_per_round_ratio": statistics.median(main),
        }
        met[name] = targets[name]["ratio"] <= bound
    return targets, met


def checks_line(result: dict) -> str:
    t, met = result["targets"], result["met"]
    parts = [
        f"{name}: {t[name]['ratio']:.3f} (<= {t[name]['max_ratio']}) {'met' if ok else 'NOT met'}"
        for name, ok in met.items()
    ]
    native = result["median_per_round_ratio_to_native_hf_frozen"]
    parts.append(
        f"native / HF frozen block: {native['native']:.2f}, HF + LoRA loop / HF frozen: "
        f"{native['native_hf_lora_loop']:.2f}"
    )
    return "checks passed (every variant computes what it should)\n" + "\n".join(parts)


def run(rounds: int, iters: int, warmup: int, seed: int = 0) -> dict:
    """Builds, checks and times the variants; returns the result record."""
    torch.set_num_threads(1)
    s = SHAPES
    load_before = os.getloadavg()
    variants = build_variants(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(s["batch"], s["seq"], s["hidden"], generator=gen).requires_grad_()
    grad_out = torch.randn(s["batch"], s["seq"], s["hidden"], generator=gen)
    checks = check_families(variants, x, grad_out)

    steps = build_steps(variants, x, grad_out)
    per_round_ms = time_rounds(steps, rounds, iters, warmup, scale=1e3, warm_step_per_round=True)
    targets, met = evaluate_targets(steps, per_round_ms, PAIRED_PER_ROUND * rounds)
    hf_experts = variants["native_hf_frozen"].experts
    return {
        "benchmark": "expert families, one FFN block, forward + backward, fp32, CPU",
        "machine": {**machine_info(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "shapes": {**s, "tokens": s["batch"] * s["seq"], "dtype": "float32"},
        "native_setup": (
            "Mixtral block, E=4 experts of width native_expert_ffn, top-2, rank 8 on each expert's gate, "
            "up and down; HF experts implementation: "
            + str(getattr(getattr(hf_experts, "config", None), "_experts_implementation", "eager (default)"))
        ),
        "timing": {
            **timing_settings(rounds, iters, warmup),
            "targets": f"paired, one step each, alternating: {PAIRED_PER_ROUND * rounds} pairs",
        },
        "trainable_params": {n: trainable_params(m) for n, m in variants.items()}
        | {n: 0 for n in VARIANTS if n not in variants},
        "checks": checks,
        "targets": targets,
        "met": met,
        # median_ms, ratio_to_dense_lora_kr, median_per_round_ratio_to_dense_lora_kr
        **summarize(per_round_ms, "dense_lora_kr", "ms"),
        **{k: v for k, v in summarize(per_round_ms, "dense_ffn", "ms").items() if k != "median_ms"},
        **{k: v for k, v in summarize(per_round_ms, "native_hf_frozen", "ms").items() if k != "median_ms"},
        "per_round_ms": per_round_ms,
    }


def render_markdown(result: dict) -> str:
    """The README's "Expert families" caption, its two tables and the native line, from a result record.

    Pure: no I/O and no timing. Every number comes from `result`.

    Args:
        result: The record `run` returns (as written to `results/family_bench.json`).

    Returns:
        The caption; the variants' median ms with their ratios to `dense_lora_kr` and `dense_ffn`; the
        targets' paired ratios, bounds and whether each is met; the native block's ratios to HF's.
    """
    return "\n\n".join(
        [_readme_caption(result), _variants_table(result), _targets_table(result), _native_line(result)]
    )


def _readme_caption(result: dict) -> str:
    s, load = result["shapes"], result["machine"]
    pairs = sorted({t["paired_pairs"] for t in result["targets"].values()})
    return paragraph(
        "**Expert families** (`benchmarks/family_bench.py` → `benchmarks/results/family_bench.json`). "
        f"One block of each family at SmolLM2's FFN shape (D={s['hidden']}, F={s['ffn']}, {s['batch']} × "
        f"{s['seq']} tokens), {s['experts']} experts, rank {s['rank']} per expert, "
        f"{result['timing']['rounds']} interleaved rounds; each target is then timed on its own, its variant "
        f"and its baseline alternating one step each ({'/'.join(map(str, pairs))} pairs), because on a "
        "shared machine a variant drifts by up to ±20% between its turns in a round. The 1-minute load "
        f"average was {load['loadavg_before'][0]:.2f} before the run and {load['loadavg_after'][0]:.2f} "
        "after it."
    )


def _variants_table(result: dict) -> str:
    s, ms = result["shapes"], result["median_ms"]
    to_lora, to_dense = result["ratio_to_dense_lora_kr"], result["ratio_to_dense_ffn"]
    rows = [
        [label.format(**s), f"{ms[name]:.1f}", f"{to_lora[name]:.2f}", f"{to_dense[name]:.2f}"]
        for name, label in README_VARIANTS.items()
    ]
    header = ["variant", "ms", f"× dense LoRA r{s['lora_rank']}", "× dense FFN"]
    return table(header, rows, "lrrr")


def _targets_table(result: dict) -> str:
    s, rows = result["shapes"], []
    for name, target in result["targets"].items():
        label = README_TARGETS.get(name, f"{target['variant']} ÷ {target['baseline']}").format(**s)
        share = name.endswith("_share")
        value = f"{target['ratio']:.1%}" if share else f"{target['ratio']:.3f}"
        bound = f"{target['max_ratio']:.0%}" if share else f"{target['max_ratio']:g}"
        rows.append([label, value, f"≤ {bound}", "yes" if result["met"][name] else "no"])
    return table(["target (issue #4)", "paired ratio", "bound", "met"], rows, "lrrl")


def _native_line(result: dict) -> str:
    to_hf = result["median_per_round_ratio_to_native_hf_frozen"]
    return paragraph(
        f"Against HF's frozen `MixtralSparseMoeBlock`, the native block costs {to_hf['native']:.2f}× and "
        f"HF's loop with LoRA added {to_hf['native_hf_lora_loop']:.2f}× (medians of the per-round ratios)."
    )


def main(argv: list[str] | None = None) -> dict:
    return cli_main(__doc__.splitlines()[0], argv, CLI, run, TABLE, checks_line)


if __name__ == "__main__":
    main()
