"""One MoE-LoRA FFN block of each expert family against the dense FFN and a plain LoRA, forward + backward.

fp32, one CPU thread, SmolLM2-135M's FFN shape (benchmarks/README.md has the variants): every family,
the router/dispatch and index-op parts, HF's Mixtral block; issue #4's targets timed paired (variant and
baseline alternating) → results/family.json. Every mtmoe variant is asserted equal to its reference
(output and every grad) before timing.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.family [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from benchmarks import cli
from benchmarks.harness import machine_info, ratios, summarize, time_rounds, timing_settings
from benchmarks.models import n_trainable, perturb_lora_b
from benchmarks.reference import NaiveMoELoRAFFN, NativeLoRALoop, PlainLoRAFFN, SwiGLU
from benchmarks.tables import paragraph, table
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
# The docs' variant rows, in order (labels formatted with the shapes); the names in bold are mtmoe's.
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
Step = Callable[[], None]


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
        "naive_moe": NaiveMoELoRAFFN(upcycled),
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


def assert_same(a: nn.Module, b: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> dict[str, Any]:
    """Asserts `a` and `b` agree in output, input grad and every parameter grad; returns the differences."""
    (out_a, dx_a, g_a), (out_b, dx_b, g_b) = (
        forward_backward(a, x, grad_out),
        forward_backward(b, x, grad_out),
    )
    torch.testing.assert_close(out_a, out_b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dx_a, dx_b, atol=1e-4, rtol=1e-4)
    assert g_a.keys() == g_b.keys(), (g_a.keys(), g_b.keys())
    for n in g_a:
        torch.testing.assert_close(g_a[n], g_b[n], atol=1e-4, rtol=1e-3, msg=n)
    return {
        "output_max_abs_diff": max_diff(out_a, out_b),
        "input_grad_max_abs_diff": max_diff(dx_a, dx_b),
        "param_grads_checked": sorted(g_a),
    }


def check_upcycled(v: dict[str, nn.Module], x: torch.Tensor, grad_out: torch.Tensor) -> dict[str, Any]:
    """Randomizes the LoRA B factors; asserts upcycled == the naive per-expert FFN, and how far from dense."""
    perturb_lora_b(v["dense_lora_kr"], 1)
    perturb_lora_b(v["upcycled"], 2)
    checks = assert_same(v["upcycled"], v["naive_moe"], x, grad_out)
    with torch.no_grad():  # the adapted block is not the base: the check above is not vacuous
        checks["mtmoe_vs_dense_max_abs_diff"] = max_diff(v["upcycled"](x), v["dense_ffn"](x))
        v["upcycled"].context.aux_losses.clear()
    return checks


def check_families(v: dict[str, nn.Module], x: torch.Tensor, grad_out: torch.Tensor) -> dict[str, Any]:
    """Asserts each mtmoe variant computes what it should; randomizes the adapters for the timing."""
    checks = {"upcycled_vs_naive_per_expert_ffn": check_upcycled(v, x, grad_out)}
    soft, dense = v["moefied_soft"], v["dense_ffn"]
    with torch.no_grad():  # fresh adapters and ω ≡ 1: exactly the dense FFN
        d_fresh = max_diff(soft(x), dense(x))
        perturb_lora_b(soft, 3)
        d_folded = max_diff(soft(x), soft.to_dense_mlp()(x))  # ω ≡ 1 still (router weights zero)
    assert d_fresh < 1e-4 and d_folded < 1e-4, (d_fresh, d_folded)
    checks["moefied_soft_vs_dense"] = {"fresh_max_abs_diff": d_fresh, "lora_folded_max_abs_diff": d_folded}

    top1 = v["moefied_top1"]
    perturb_lora_b(top1, 4)
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

    native, hf = v["native"], v["native_hf_frozen"]
    with torch.no_grad():
        d_hf = max_diff(native(x), hf(x))
        native.context.aux_losses.clear()
    assert d_hf < 1e-5, d_hf
    perturb_lora_b(native, 5)
    loop = assert_same(native, v["native_hf_lora_loop"], x, grad_out)
    checks["native_vs_hf"] = {
        "fresh_vs_hf_block_max_abs_diff": d_hf,
        **{f"vs_lora_loop_{k}": loop[k] for k in ("output_max_abs_diff", "input_grad_max_abs_diff")},
        "param_grads_checked": loop["param_grads_checked"],
    }
    return checks


def block_step(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> Step:
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


def router_dispatch_step(router: TopKRouter, x_TD: torch.Tensor, num_experts: int) -> Step:
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


def index_ops_step(router: TopKRouter, x_TD: torch.Tensor, wide: int | None) -> Step:
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


def build_steps(v: dict[str, nn.Module], x: torch.Tensor, grad_out: torch.Tensor) -> dict[str, Step]:
    x_TD = x.detach().reshape(-1, SHAPES["hidden"]).clone().requires_grad_()
    up, top1 = v["upcycled"], v["moefied_top1"]
    steps = {name: block_step(m, x, grad_out) for name, m in v.items() if name != "naive_moe"}
    steps["upcycled_router_dispatch"] = router_dispatch_step(up.router, x_TD, SHAPES["experts"])
    steps["upcycled_index_ops"] = index_ops_step(up.router, x_TD, SHAPES["ffn"])
    steps["moefied_top1_router_dispatch"] = router_dispatch_step(top1.router, x_TD, SHAPES["experts"])
    steps["moefied_top1_index_ops"] = index_ops_step(top1.router, x_TD, None)
    return {name: steps[name] for name in VARIANTS}


def evaluate_targets(
    steps: dict[str, Step], per_round: dict[str, list[float]], pairs: int
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


def inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The input (requires grad) and the output grad of every step."""
    s, gen = SHAPES, torch.Generator().manual_seed(seed + 1)
    x = torch.randn(s["batch"], s["seq"], s["hidden"], generator=gen).requires_grad_()
    return x, torch.randn(s["batch"], s["seq"], s["hidden"], generator=gen)


def run_families(args: argparse.Namespace, seed: int = 0) -> dict[str, Any]:
    """Builds, checks and times every family's variants; returns the result record."""
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    variants = build_variants(seed)
    x, grad_out = inputs(seed)
    checks = check_families(variants, x, grad_out)
    steps = build_steps(variants, x, grad_out)
    rounds = args.rounds
    per_round_ms = time_rounds(steps, rounds, args.iters, args.warmup, scale=1e3, warm_step_per_round=True)
    pairs = PAIRED_PER_ROUND * rounds
    targets, met = evaluate_targets(steps, per_round_ms, pairs)
    experts_impl = getattr(
        getattr(variants["native_hf_frozen"].experts, "config", None), "_experts_implementation", None
    )
    return {
        "benchmark": "expert families, one FFN block, forward + backward, fp32, CPU",
        "machine": machine_info(loadavg_before=load_before, loadavg_after=os.getloadavg()),
        "shapes": {**SHAPES, "tokens": SHAPES["batch"] * SHAPES["seq"], "dtype": "float32"},
        "native_setup": (
            "Mixtral block, E=4 experts of width native_expert_ffn, top-2, rank 8 on each expert's gate, "
            f"up and down; HF experts implementation: {experts_impl or 'eager (default)'}"
        ),
        "timing": timing_settings(
            rounds, args.iters, args.warmup, targets=f"paired, one step each, alternating: {pairs} pairs"
        ),
        "trainable_params": {n: n_trainable(variants[n]) if n in variants else 0 for n in VARIANTS},
        "checks": checks,
        "targets": targets,
        "met": met,
        # median_ms, then the ratios to dense_lora_kr, dense_ffn and native_hf_frozen
        **summarize(per_round_ms, "dense_lora_kr", "ms"),
        **ratios(per_round_ms, "dense_ffn"),
        **ratios(per_round_ms, "native_hf_frozen"),
        "per_round_ms": per_round_ms,
    }


def render_markdown(result: Mapping[str, Any]) -> str:
    """The docs' "Expert families" caption, its two tables and the native line, from a result record."""
    return "\n\n".join(
        [_families_caption(result), _variants_table(result), _targets_table(result), _native_line(result)]
    )


def _families_caption(result: Mapping[str, Any]) -> str:
    s, load = result["shapes"], result["machine"]
    pairs = sorted({t["paired_pairs"] for t in result["targets"].values()})
    return paragraph(
        "**Expert families** (`python -m benchmarks.family` → `benchmarks/results/family.json`). "
        f"One block of each family at SmolLM2's FFN shape (D={s['hidden']}, F={s['ffn']}, {s['batch']} × "
        f"{s['seq']} tokens), {s['experts']} experts, rank {s['rank']} per expert, "
        f"{result['timing']['rounds']} interleaved rounds; each target is then timed on its own, its variant "
        f"and its baseline alternating one step each ({'/'.join(map(str, pairs))} pairs), because on a "
        "shared machine a variant drifts by up to ±20% between its turns in a round. The 1-minute load "
        f"average was {load['loadavg_before'][0]:.2f} before the run and {load['loadavg_after'][0]:.2f} "
        "after it."
    )


def _variants_table(result: Mapping[str, Any]) -> str:
    s, ms = result["shapes"], result["median_ms"]
    to_lora, to_dense = result["ratio_to_dense_lora_kr"], result["ratio_to_dense_ffn"]
    rows = [
        [label.format(**s), f"{ms[name]:.1f}", f"{to_lora[name]:.2f}", f"{to_dense[name]:.2f}"]
        for name, label in README_VARIANTS.items()
    ]
    return table(["variant", "ms", f"× dense LoRA r{s['lora_rank']}", "× dense FFN"], rows, "lrrr")


def _targets_table(result: Mapping[str, Any]) -> str:
    s, rows = result["shapes"], []
    for name, target in result["targets"].items():
        label = README_TARGETS.get(name, f"{target['variant']} ÷ {target['baseline']}").format(**s)
        share = name.endswith("_share")
        value = f"{target['ratio']:.1%}" if share else f"{target['ratio']:.3f}"
        bound = f"{target['max_ratio']:.0%}" if share else f"{target['max_ratio']:g}"
        rows.append([label, value, f"≤ {bound}", "yes" if result["met"][name] else "no"])
    return table(["target (issue #4)", "paired ratio", "bound", "met"], rows, "lrrl")


def _native_line(result: Mapping[str, Any]) -> str:
    to_hf = result["median_per_round_ratio_to_native_hf_frozen"]
    return paragraph(
        f"Against HF's frozen `MixtralSparseMoeBlock`, the native block costs {to_hf['native']:.2f}× and "
        f"HF's loop with LoRA added {to_hf['native_hf_lora_loop']:.2f}× (medians of the per-round ratios)."
    )


MODE = cli.Mode(
    cli.CliDefaults(cli.RESULTS / "family.json", rounds=12, iters=3, warmup=2, quick=(2, 1, 1)),
    run_families, render_markdown, help="every expert family, paired targets",
)  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return cli.main(__doc__.splitlines()[0], MODE, argv)


if __name__ == "__main__":
    main()
