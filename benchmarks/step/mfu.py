"""The `mfu` mode: a CPU stand-in for MFU, a training step's counted FLOP/s over a large fp32 matmul's.

One CPU thread has no published peak, so the "peak" is measured in the same run: an N x N @ N x N fp32
matmul, interleaved with the mtmoe step (`compare`'s `mtmoe_moe_lora`) and the floor step of two
configs: the real SmolLM2-135M and a random Llama with d = 1024 through the same recipe. FLOPs are counted
with `FlopCounterMode` as executed (recomputation included), next to an analytic estimate. Issue #8's
target: >= 0.5 at d >= 512.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from benchmarks import cli
from benchmarks.harness import machine_info, time_rounds, timing_settings
from benchmarks.models import build_mtmoe, recipe
from benchmarks.step.common import SETUP, count_flops, make_batch, mtmoe_and_floor
from mtmoe.model.block import MoELoRAFFN
from mtmoe.model.moe_lm import MoELM

MATMUL_N = 2048
MATMUL_REPEATS = 4
PEAK = "matmul_peak"
TARGET_MFU = 0.5
TARGET_MIN_DIM = 512
# Each config: the overrides that turn the demo recipe into it (none: the real SmolLM2-135M).
CONFIGS: dict[str, list[str]] = {
    "smollm2_135m": [],
    "llama_d1024": [
        "model.base=tiny-llama",
        "model.tiny={hidden_size: 1024, intermediate_size: 2816, num_hidden_layers: 8, "
        "num_attention_heads: 16, num_key_value_heads: 4, max_position_embeddings: 1024, "
        "tie_word_embeddings: true}",
    ],
}
KINDS = ("mtmoe", "floor")
VARIANTS = (PEAK, *(f"{c}_{k}" for c in CONFIGS for k in KINDS))
CLI = cli.CliDefaults(cli.RESULTS / "step_mfu.json", rounds=8, iters=1, warmup=1, quick=(1, 1, 1), tiny=True)

Step = Callable[[], object]


def model_shape(moe: MoELM) -> dict[str, int]:
    """The shapes the analytic FLOP estimate needs, read from the model."""
    c = moe.lm.config
    blocks = [m for m in moe.modules() if isinstance(m, MoELoRAFFN)]
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return {
        "hidden": c.hidden_size,
        "ffn": c.intermediate_size,
        "layers": c.num_hidden_layers,
        "heads": c.num_attention_heads,
        "kv_heads": c.num_key_value_heads,
        "head_dim": head_dim,
        "vocab": c.vocab_size,
        "moe_blocks": len(blocks),
        "experts": blocks[0].num_experts,
        "top_k": blocks[0].router.top_k,
        "rank": blocks[0].experts.gate_a.shape[2],
        "frozen_params": sum(p.numel() for p in moe.parameters() if not p.requires_grad),
        "trainable_params": sum(p.numel() for p in moe.parameters() if p.requires_grad),
    }


def analytic_flops(shape: Mapping[str, int], tokens: int, batch: int, seq: int, targets: int) -> dict:
    """An estimate of the FLOPs of one mtmoe step and one floor step (matmuls only), by component.

    Assumes every layer holds an MoE-LoRA block. The first layer's input needs no grad (nothing before it
    trains), so the backward's input grads run through the other L-1 layers, plus, for mtmoe, the first
    block's W2 (the grad of its SwiGLU output feeds its gate/up LoRA factors); the floor stops at the
    first FFN's output.

    Args:
        shape: From `model_shape`.
        tokens: T = batch x seq.
        batch: B.
        seq: S.
        targets: Target positions (where the LM head runs).

    Returns:
        `mtmoe` and `floor`: per component and `total`; `mtmoe_recompute`: of mtmoe's total, the FLOPs
        the backward recomputes (the expert kernel's gate/up rows, attention scores).
    """
    D, F, L = shape["hidden"], shape["ffn"], shape["layers"]
    H, KV, hd, V = shape["heads"], shape["kv_heads"], shape["head_dim"], shape["vocab"]
    E, K, R, T = shape["experts"], shape["top_k"], shape["rank"], tokens
    N = T * K  # assignments
    p_layer = D * H * hd + 2 * D * KV * hd + H * hd * D + 3 * D * F
    bmm = 2 * batch * H * seq * seq * hd  # one S x S attention product over all heads
    xa, n_rf, down_b = 2 * T * D * 2 * E * R, 2 * N * R * F, 2 * T * E * R * D
    lora_fwd = xa + 2 * n_rf + n_rf + down_b  # x A, xa B1 and xa B3, h A2, ha B2
    # recompute xa B1, xa B3; d(hw) and dA2; dxa and dB1, dB3; dB2 and d(ha); dA and dx of x A
    lora_bwd = 2 * n_rf + 2 * n_rf + 4 * n_rf + 2 * down_b + 2 * xa
    router = 2 * T * D * E
    common = {
        "frozen_matmuls_fwd": 2 * T * L * p_layer,
        "lm_head_fwd": 2 * targets * V * D,
        "lm_head_input_grad": 2 * targets * V * D,
        "attention_fwd": L * 2 * bmm,
        "attention_bwd": (L - 1) * 5 * bmm,  # the counter's formula: 4 products and the scores again
    }
    mtmoe = {
        **common,
        "frozen_matmuls_input_grad": 2 * T * ((L - 1) * p_layer + F * D),
        "lora_fwd": shape["moe_blocks"] * lora_fwd,
        "lora_bwd": shape["moe_blocks"] * lora_bwd - xa,  # the first block's x needs no grad
        "router_fwd_bwd": shape["moe_blocks"] * 3 * router - router,
    }
    floor = {**common, "frozen_matmuls_input_grad": 2 * T * (L - 1) * p_layer}
    for part in (mtmoe, floor):
        part["total"] = sum(part.values())
    return {
        "mtmoe": mtmoe,
        "floor": floor,
        "mtmoe_recompute": shape["moe_blocks"] * 2 * n_rf + (L - 1) * bmm,
    }


def peak_step() -> tuple[Step, int]:
    """The "peak" call: `MATMUL_REPEATS` fp32 matmuls of N x N @ N x N; returns it and its FLOPs."""
    gen = torch.Generator().manual_seed(0)
    a_NN, b_NN = (torch.randn(MATMUL_N, MATMUL_N, generator=gen) for _ in range(2))
    c_NN = torch.empty(MATMUL_N, MATMUL_N)

    def step() -> None:
        for _ in range(MATMUL_REPEATS):
            torch.mm(a_NN, b_NN, out=c_NN)

    return step, MATMUL_REPEATS * 2 * MATMUL_N**3


def utilization(
    per_round_s: Mapping[str, list[float]], flops: Mapping[str, int]
) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """GFLOP/s of the medians, their ratio to the peak's, and the median of the per-round ratios."""
    median_s = {n: statistics.median(t) for n, t in per_round_s.items()}
    gflop_per_s = {n: flops[n] / median_s[n] / 1e9 for n in per_round_s}
    ratio = {n: gflop_per_s[n] / gflop_per_s[PEAK] for n in per_round_s}
    peak_rounds = [flops[PEAK] / t for t in per_round_s[PEAK]]
    per_round = {
        n: statistics.median(flops[n] / t / p for t, p in zip(times, peak_rounds, strict=True))
        for n, times in per_round_s.items()
    }
    return gflop_per_s, ratio, per_round


def run(args: argparse.Namespace, seed: int = 0) -> dict[str, Any]:
    """Builds both configs, counts their FLOPs, times everything interleaved; returns the result record.

    `--tiny` (the smoke test) makes both configs the tiny random Llama.
    """
    configs = {n: list(cli.TINY_OVERRIDES) for n in CONFIGS} if args.tiny else CONFIGS
    torch.set_num_threads(1)
    load_start = os.getloadavg()
    batch = make_batch(seed)
    steps, flops, counted, shapes = {}, {}, {}, {}
    steps[PEAK], flops[PEAK] = peak_step()
    t0 = time.perf_counter()
    for name, overrides in configs.items():
        moe = build_mtmoe(recipe(overrides=overrides))
        shapes[name] = model_shape(moe)
        for kind, step in mtmoe_and_floor(moe, batch).items():
            step()  # the first call allocates; count a warm one
            counted[f"{name}_{kind}"] = count_flops(step)
            steps[f"{name}_{kind}"] = step
    setup_wall_s = time.perf_counter() - t0
    flops.update({n: c["total"] for n, c in counted.items()})
    per_round_s = time_rounds(steps, args.rounds, args.iters, args.warmup)
    gflop_per_s, ratio, per_round_ratio = utilization(per_round_s, flops)

    tokens, targets = SETUP["batch"] * SETUP["seq"], int(batch["loss_mask"][:, 1:].sum())
    analytic = {
        n: analytic_flops(s, tokens, SETUP["batch"], SETUP["seq"], targets) for n, s in shapes.items()
    }
    return {
        "benchmark": "CPU stand-in for MFU: mtmoe training step FLOP/s / fp32 matmul FLOP/s",
        "machine": machine_info(loadavg_start=load_start, loadavg_end=os.getloadavg()),
        "setup": {
            "matmul": {"n": MATMUL_N, "repeats_per_call": MATMUL_REPEATS, "dtype": "float32"},
            "batch": SETUP["batch"],
            "seq": SETUP["seq"],
            "tokens": tokens,
            "target_tokens": targets,
            "recipe": SETUP["recipe"],
            "configs": {n: {"overrides": configs[n], **shapes[n]} for n in configs},
            "seed": seed,
        },
        "timing": timing_settings(args.rounds, args.iters, args.warmup, setup_wall_s=setup_wall_s),
        "flops": {
            "used": "counted (FlopCounterMode, the step as executed, recomputation included)",
            "counted": counted,
            "analytic": analytic,
            "per_call": flops,
        },
        "median_s": {n: statistics.median(t) for n, t in per_round_s.items()},
        "counted_gflop": {n: flops[n] / 1e9 for n in VARIANTS},
        "gflop_per_s": gflop_per_s,
        "ratio_to_peak": ratio,
        "median_per_round_ratio_to_peak": per_round_ratio,
        "targets": judge_targets(shapes, ratio),
        "per_round_s": per_round_s,
    }


def judge_targets(shapes: Mapping[str, Mapping[str, int]], ratio: Mapping[str, float]) -> dict[str, Any]:
    """Issue #8's MFU target (>= 0.5 at d >= 512) for each config's mtmoe step."""
    out = {}
    for name, shape in shapes.items():
        applies = shape["hidden"] >= TARGET_MIN_DIM
        value = ratio[f"{name}_mtmoe"]
        out[name] = {
            "mfu": value,
            "bound": f">= {TARGET_MFU}",
            "applies": applies,
            "met": bool(value >= TARGET_MFU) if applies else None,
        }
    return out


def render_markdown(result: Mapping[str, Any]) -> str:
    """The README table of a result record (a pure function of it, as read back from the JSON)."""
    setup, flops, gfs = result["setup"], result["flops"], result["gflop_per_s"]
    mm = setup["matmul"]
    lines = [
        "| config | d | F | layers | frozen params | step s | counted GFLOP (analytic) | GFLOP/s "
        "| MFU stand-in | floor: GFLOP/s, utilization | target ≥ 0.5 met |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, shape in setup["configs"].items():
        mt, fl, target = f"{name}_mtmoe", f"{name}_floor", result["targets"][name]
        analytic = flops["analytic"][name]["mtmoe"]["total"] / 1e9
        met = "—" if target["met"] is None else ("yes" if target["met"] else "no")
        lines.append(
            f"| {name} | {shape['hidden']} | {shape['ffn']} | {shape['layers']} "
            f"| {shape['frozen_params'] / 1e6:.0f}M | {result['median_s'][mt]:.2f} "
            f"| {result['counted_gflop'][mt]:.0f} ({analytic:.0f}) | {gfs[mt]:.1f} "
            f"| **{result['ratio_to_peak'][mt]:.2f}** | {gfs[fl]:.1f}, {result['ratio_to_peak'][fl]:.2f} "
            f"| {met} |"
        )
    lines += [
        "",
        f"Peak: {mm['n']}×{mm['n']} @ {mm['n']}×{mm['n']} fp32 matmul, {gfs[PEAK]:.1f} GFLOP/s on one "
        f"thread (median of {result['timing']['rounds']} rounds, interleaved with the steps). A step is "
        f"forward + backward of {setup['batch']} × {setup['seq']} tokens ({setup['target_tokens']} "
        "targets); its FLOPs are counted by `FlopCounterMode` as executed, recomputation included.",
    ]
    return "\n".join(lines)


MODE = cli.Mode(CLI, run, render_markdown, help="the step's FLOP/s over a large matmul's (MFU on CPU)")
