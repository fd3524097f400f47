"""A CPU stand-in for MFU: a whole mtmoe training step's FLOP/s against one large fp32 matmul's FLOP/s.

A GPU's MFU divides a step's model FLOP/s by the chip's peak. One CPU thread has no published peak, so
the "peak" here is measured: the FLOP/s of an N x N @ N x N fp32 matmul (N = 2048 by default, repeated 4
times per timed call), the best case for the same BLAS the model's matmuls use. In the same run, and
interleaved with it, the script times:
    <config>_mtmoe: a full mtmoe training step, as `model_step_bench.py`'s `mtmoe_moe_lora` variant:
        forward + backward of `build_model` with the demo recipe's MoE-LoRA (4 experts, top-2, rank 8 on
        every FFN), LM head only at the target positions, CE + aux, grads cleared before each step;
    <config>_floor: the same frozen base with no adapters, as `model_step_bench.py`'s `frozen_floor`
        (input grads only from the first adapted FFN's output on; LM head only at the targets);
for two configs:
    smollm2_135m: the real SmolLM2-135M-Instruct (D=576, F=1536, 30 layers), i.e. the demo recipe;
    llama_d1024: a random-weight Llama (`model.base: tiny-llama` with `model.tiny` overrides: D=1024,
        F=2816, 8 layers, 16 heads of 64, 4 KV heads, SmolLM2's vocabulary), with the same MoE-LoRA
        injected by `build_model`.
Every step sees the same batch: 4 x 128 random tokens, ~25% of them targets (`model_step_bench`).

FLOPs. Each step is run once under `torch.utils.flop_counter.FlopCounterMode` (forward and backward):
the counted FLOPs are those of the step as executed, excluding nothing, so work the backward recomputes
is counted too (`_ExpertSwiGLU` recomputes its gate/up rows; flash attention recomputes its scores). The
counter does not know three ops this step runs; the script registers them with the counter's own
formulas: `aten.addmm_` (the expert kernel's in-place matmuls) and the CPU flash attention forward and
backward (full S x S, as for the GPU kernels). An analytic estimate of the same step is given next to it
(frozen matmuls 2·P·T forward and 2·P·T input grads, the target-only LM head, attention, the router and
the MoE-LoRA paths as mtmoe computes them, recomputation included and also listed on its own): the two
should agree to a few percent. The MFU stand-in uses the counted FLOPs.

MFU stand-in = (counted step FLOPs / median step time) / (matmul FLOPs / median matmul time), from the
medians (the JSON also holds the median of the per-round ratios). Issue #8's target: >= 0.5 at d >= 512;
the floor's utilization is reported next to it.

Timing: `time.process_time`, one thread, 1 warm-up call per variant, then 8 interleaved rounds (order
rotated each round) of 1 timed call per variant; medians. The JSON (`results/mfu_bench.json`) holds the
machine, the settings, every round's times, the FLOP counts (per op) and estimates, the ratios and
whether the target is met; `render_markdown` gives the README table (`--render PATH` prints it).

Run (from the repository root; the base model is the cached HF folder under .cache/):
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/mfu_bench.py          # ~4 min, full
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/mfu_bench.py --quick  # ~2 min, prints
    ... --quick --tiny   # the smoke test: both configs as a tiny random Llama
    .venv/bin/python benchmarks/mfu_bench.py --render benchmarks/results/mfu_bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from bench_cli import TINY_OVERRIDES
from harness import CliDefaults, Table, cli_main, machine_info, time_rounds, timing_settings
from model_step_bench import RECIPE, SETUP, VOCAB, frozen_floor_loss, make_batch, make_step, trainable
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from mtmoe.config import load_config
from mtmoe.model.block import MoELoRAFFN
from mtmoe.model.moe_lm import MoELM, build_model

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "mfu_bench.json"
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
CLI = CliDefaults(rounds=8, iters=1, warmup=1, quick=(1, 1, 1), iter_name="calls", out=DEFAULT_OUT, tiny=True)
TABLE = Table(
    VARIANTS,
    header=f"{'variant':<22}{'median s':>10}{'GFLOP':>9}{'GFLOP/s':>9}{'x peak':>8}",
    row="{name:<22}{median_s:>10.3f}{counted_gflop:>9.1f}{gflop_per_s:>9.1f}{ratio_to_peak:>8.3f}",
)

Step = Callable[[], object]
Shape = tuple[int, ...]


def _addmm_flops(self_shape: Shape, mat1_shape: Shape, mat2_shape: Shape, *args: Any, **kwargs: Any) -> int:
    """FLOPs of (in-place) addmm: those of its matrix product, as the counter's `addmm` formula."""
    (m, k), (_, n) = mat1_shape, mat2_shape
    return 2 * m * k * n


def _sdpa_flops(q_shape: Shape, k_shape: Shape, v_shape: Shape, *args: Any, **kwargs: Any) -> int:
    """FLOPs of the CPU flash-attention forward: the counter's SDPA formula (full S x S)."""
    return sdpa_flop_count(q_shape, k_shape, v_shape)


def _sdpa_backward_flops(
    grad_shape: Shape, q_shape: Shape, k_shape: Shape, v_shape: Shape, *args: Any, **kwargs: Any
) -> int:
    """FLOPs of the CPU flash-attention backward: the counter's SDPA backward formula (scores recomputed)."""
    return sdpa_backward_flop_count(grad_shape, q_shape, k_shape, v_shape)


# Ops the flop counter does not know, with its own formulas: the in-place addmm of the expert kernel and
# the CPU flash attention (the counter registers only the GPU attention kernels).
EXTRA_FLOP_FORMULAS = {
    torch.ops.aten.addmm_: _addmm_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward_flops,
}


def build_config_model(overrides: list[str]) -> tuple[MoELM, float]:
    """The demo recipe with `overrides`, built by `build_model`; returns it and the aux-loss coefficient."""
    cfg = load_config(RECIPE, overrides)
    return build_model(cfg, VOCAB, num_tasks=1).train(), cfg.moe.aux_loss_coef


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


def count_flops(step: Step) -> dict[str, Any]:
    """Runs `step` once under the flop counter; returns the total and the per-op counts."""
    with FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as counter:
        step()
    per_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return {"total": int(counter.get_total_flops()), "per_op": per_op}


def peak_step() -> tuple[Step, int]:
    """The "peak" call: `MATMUL_REPEATS` fp32 matmuls of N x N @ N x N; returns it and its FLOPs."""
    gen = torch.Generator().manual_seed(0)
    a_NN, b_NN = (torch.randn(MATMUL_N, MATMUL_N, generator=gen) for _ in range(2))
    c_NN = torch.empty(MATMUL_N, MATMUL_N)

    def step() -> None:
        for _ in range(MATMUL_REPEATS):
            torch.mm(a_NN, b_NN, out=c_NN)

    return step, MATMUL_REPEATS * 2 * MATMUL_N**3


def config_steps(moe: MoELM, aux_coef: float, batch: dict[str, torch.Tensor]) -> dict[str, Step]:
    """A config's mtmoe training step and floor step (see the module docstring)."""
    ids, attn, mask, task_ids = (batch[k] for k in ("input_ids", "attention_mask", "loss_mask", "task_ids"))

    def moe_terms() -> tuple[torch.Tensor, torch.Tensor]:
        loss_BS, aux = moe(ids, attn, mask, task_ids)
        return loss_BS.sum() / mask.sum(), aux

    def floor_terms() -> tuple[torch.Tensor, None]:
        return frozen_floor_loss(moe, batch), None

    return {
        "mtmoe": make_step(moe_terms, list(trainable(moe).values()), aux_coef),
        "floor": make_step(floor_terms, [], aux_coef),
    }


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


def run(rounds: int, iters: int, warmup: int, seed: int = 0, tiny: bool = False) -> dict[str, Any]:
    """Builds both configs, counts their FLOPs, times everything interleaved; returns the result record.

    `tiny` (the smoke test) makes both configs the tiny random Llama.
    """
    configs = {n: list(TINY_OVERRIDES) for n in CONFIGS} if tiny else CONFIGS
    torch.set_num_threads(1)
    load_start = os.getloadavg()
    batch = make_batch(seed)
    steps, flops, counted, shapes = {}, {}, {}, {}
    steps[PEAK], flops[PEAK] = peak_step()
    t0 = time.perf_counter()
    for name, overrides in configs.items():
        moe, aux_coef = build_config_model(overrides)
        shapes[name] = model_shape(moe)
        for kind, step in config_steps(moe, aux_coef, batch).items():
            step()  # the first call allocates; count a warm one
            counted[f"{name}_{kind}"] = count_flops(step)
            steps[f"{name}_{kind}"] = step
    setup_wall_s = time.perf_counter() - t0
    flops.update({n: c["total"] for n, c in counted.items()})
    per_round_s = time_rounds(steps, rounds, iters, warmup)
    gflop_per_s, ratio, per_round_ratio = utilization(per_round_s, flops)

    tokens, targets = SETUP["batch"] * SETUP["seq"], int(batch["loss_mask"][:, 1:].sum())
    analytic = {
        n: analytic_flops(s, tokens, SETUP["batch"], SETUP["seq"], targets) for n, s in shapes.items()
    }
    return {
        "benchmark": "CPU stand-in for MFU: mtmoe training step FLOP/s / fp32 matmul FLOP/s",
        "machine": {**machine_info(), "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
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
        "timing": {**timing_settings(rounds, iters, warmup), "setup_wall_s": setup_wall_s},
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


def checks_line(result: Mapping[str, Any]) -> str:
    """The line under the printed table: counted vs analytic FLOPs, and the targets."""
    parts = []
    for name in CONFIGS:
        for kind in KINDS:
            counted = result["flops"]["per_call"][f"{name}_{kind}"]
            estimate = result["flops"]["analytic"][name][kind]["total"]
            parts.append(f"{name}_{kind} counted/analytic {counted / estimate:.3f}")
    targets = "; ".join(f"{n} MFU {t['mfu']:.2f} met={t['met']}" for n, t in result["targets"].items())
    return "; ".join(parts) + "\n" + targets


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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark (see the module docstring), or with `--render PATH` only prints a JSON's table."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--render", type=Path, default=None)
    known, rest = pre.parse_known_args(argv)
    if known.render is not None:
        result = json.loads(known.render.read_text())
        print(render_markdown(result))
        return result
    result = cli_main(__doc__.splitlines()[0], rest, CLI, run, TABLE, checks_line)
    print(render_markdown(result))
    return result


if __name__ == "__main__":
    main()
