"""The `profile` mode: where the time of one mtmoe training step goes, by part of the model and by op kind.

`torch.profiler` (CPU, `record_shapes=True`) records every aten op of `compare`'s `mtmoe_moe_lora` step
and of the floor's, alternating, and each variant's median step (by wall time) is reported whole, so its
parts add up (`attribution` says how an op's time is attributed). Both steps are also timed without the
profiler, which gives an estimate of the unprofiled Python and framework time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

import torch

from benchmarks import cli
from benchmarks.harness import machine_info, rotated
from benchmarks.models import build_mtmoe, recipe
from benchmarks.step.attribution import KINDS, PARTS, profile_step
from benchmarks.step.common import SETUP, make_batch, mtmoe_and_floor
from mtmoe.model.block import MoELoRAFFN
from mtmoe.model.moe_lm import MoELM

VARIANTS = ("mtmoe", "floor")
BLOCK_PARTS = ("router", "dispatch", "lora_ab", "expert_kernel", "ffn_glue")
PROFILED_STEPS, QUICK_PROFILED_STEPS = 5, 1
TIMED_ROUNDS, QUICK_TIMED_ROUNDS = 5, 1
CLI = cli.CliDefaults(
    cli.RESULTS / "step_profile.json", quick_help="1 profiled step, 1 timed round; prints only", tiny=True
)


def profile_interleaved(moe: MoELM, step_fns: Mapping[str, Callable[[], object]], rounds: int) -> dict:
    """Profiles one step of each variant per round (order rotated); keeps each variant's median step.

    Returns:
        `median_step`: per variant, the profile of the step with the median profiled wall time (one
        whole step, so its parts add up); `profiled_wall_ms`: per variant, every profiled step's wall time.
    """
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in step_fns}
    for r in range(rounds):
        for name in rotated(list(step_fns), r):
            runs[name].append(profile_step(moe, step_fns[name]))
    median_step = {}
    for name, profiles in runs.items():
        ordered = sorted(profiles, key=lambda p: p["profiled_wall_ms"])
        median_step[name] = ordered[(len(ordered) - 1) // 2]
    walls = {n: [p["profiled_wall_ms"] for p in ps] for n, ps in runs.items()}
    return {"median_step": median_step, "profiled_wall_ms": walls}


def time_unprofiled(step_fns: Mapping[str, Callable[[], object]], rounds: int) -> dict[str, Any]:
    """Process and wall time per step of each variant, interleaved and rotated, without the profiler."""
    cpu: dict[str, list[float]] = {n: [] for n in step_fns}
    wall: dict[str, list[float]] = {n: [] for n in step_fns}
    for r in range(rounds):
        for name in rotated(list(step_fns), r):
            t0, w0 = time.process_time(), time.perf_counter()
            step_fns[name]()
            cpu[name].append((time.process_time() - t0) * 1e3)
            wall[name].append((time.perf_counter() - w0) * 1e3)
    return {
        "median_process_ms": {n: statistics.median(v) for n, v in cpu.items()},
        "median_wall_ms": {n: statistics.median(v) for n, v in wall.items()},
        "per_round_process_ms": cpu,
        "per_round_wall_ms": wall,
    }


def per_block(prof: Mapping[str, Any], blocks: int) -> dict[str, dict[str, float]]:
    """The FFN parts per block (a step's numbers over the FFN blocks): op calls, op self ms, framework ms."""
    out = {}
    for part in BLOCK_PARTS:
        phases = prof["ms"].get(part, {})
        framework = sum(k.get("framework", 0.0) for k in phases.values())
        total = sum(sum(k.values()) for k in phases.values())
        out[part] = {
            "op_calls": prof["op_calls_per_step"].get(part, 0) / blocks,
            "op_ms": (total - framework) / blocks,
            "framework_ms": framework / blocks,
        }
    return out


def summarize_variant(prof: Mapping[str, Any], unprofiled_wall_ms: float, blocks: int) -> dict[str, Any]:
    """One variant's totals: per part and kind (ms per step), per FFN block, and the overhead estimate."""
    ms = prof["ms"]
    part_total = {p: sum(sum(k.values()) for k in ph.values()) for p, ph in ms.items()}
    kind_total: dict[str, float] = defaultdict(float)
    for phases in ms.values():
        for kinds in phases.values():
            for kind, t in kinds.items():
                kind_total[kind] += t
    op_ms = sum(t for k, t in kind_total.items() if k != "framework")
    return {
        "part_ms": part_total,
        "kind_ms": dict(kind_total),
        "op_self_ms": op_ms,
        "framework_profiled_ms": kind_total["framework"],
        "unprofiled_wall_ms": unprofiled_wall_ms,
        "framework_unprofiled_estimate_ms": unprofiled_wall_ms - op_ms,
        "profiler_overhead_ms": prof["profiled_wall_ms"] - unprofiled_wall_ms,
        "op_calls_per_step": sum(prof["op_calls_per_step"].values()),
        "per_block": per_block(prof, blocks),
    }


def run(args: argparse.Namespace, seed: int = 0) -> dict[str, Any]:
    """Builds the demo model, times both steps without the profiler, then profiles them."""
    profiled_steps = QUICK_PROFILED_STEPS if args.quick else PROFILED_STEPS
    timed_rounds = QUICK_TIMED_ROUNDS if args.quick else TIMED_ROUNDS
    tiny = args.tiny
    torch.set_num_threads(1)
    load_start = os.getloadavg()
    moe = build_mtmoe(recipe(tiny))
    model = "a tiny random Llama (smoke test)" if tiny else "SmolLM2-135M-Instruct"
    batch = make_batch(seed)
    step_fns = mtmoe_and_floor(moe, batch)
    for fn in step_fns.values():
        fn()  # warm-up
    timing = time_unprofiled(step_fns, timed_rounds)
    profiled = profile_interleaved(moe, step_fns, profiled_steps)
    profiles = profiled["median_step"]
    blocks = sum(isinstance(m, MoELoRAFFN) for m in moe.modules())
    summary = {n: summarize_variant(profiles[n], timing["median_wall_ms"][n], blocks) for n in VARIANTS}
    return {
        "benchmark": f"profile of one mtmoe training step of {model} (fp32, CPU, one thread)",
        "machine": machine_info(loadavg_start=load_start, loadavg_end=os.getloadavg()),
        "setup": {
            **{k: SETUP[k] for k in ("batch", "seq", "loss_fraction", "recipe")},
            "tiny": tiny,
            "target_tokens": int(batch["loss_mask"].sum()),
            "moe_blocks": blocks,
            "profiled_steps": profiled_steps,
            "timed_rounds": timed_rounds,
            "profiler": "torch.profiler, CPU activity, record_shapes=True, parts labelled by ranges",
        },
        "parts": PARTS,
        "kinds": KINDS,
        "unprofiled": timing,
        "profile": profiles,
        "profiled_wall_ms": profiled["profiled_wall_ms"],
        "summary": summary,
    }


def _ms(part: Mapping[str, Mapping[str, float]], phase: str, kinds: tuple[str, ...] | None = None) -> float:
    """A part's ms in one phase, summed over `kinds` (None: all)."""
    return sum(t for k, t in part.get(phase, {}).items() if kinds is None or k in kinds)


def _estimate(ms: float) -> str:
    """An unprofiled-overhead estimate as text; a negative one is below the run-to-run noise."""
    return f"{ms:.0f} ms" if ms >= 0 else "less than the run-to-run noise"


def render_markdown(result: Mapping[str, Any]) -> str:
    """The README tables of a result record: by part and by op kind (a pure function of the record)."""
    prof, summ = result["profile"], result["summary"]
    mt, fl = prof["mtmoe"]["ms"], prof["floor"]["ms"]
    ops = tuple(k for k in KINDS if k != "framework")
    wall = prof["mtmoe"]["profiled_wall_ms"]
    lines = [
        "| part | mtmoe fwd ms | mtmoe bwd ms | of which copies/casts/index | floor ms | mtmoe − floor "
        "| share of mtmoe |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for part, label in result["parts"].items():
        fwd, bwd = _ms(mt.get(part, {}), "fwd", ops), _ms(mt.get(part, {}), "bwd", ops)
        if fwd + bwd + _ms(fl.get(part, {}), "fwd", ops) + _ms(fl.get(part, {}), "bwd", ops) < 0.05:
            continue
        copies = sum(_ms(mt.get(part, {}), ph, ("copy_index",)) for ph in ("fwd", "bwd"))
        floor = sum(_ms(fl.get(part, {}), ph, ops) for ph in ("fwd", "bwd"))
        lines.append(
            f"| {label} | {fwd:.0f} | {bwd:.0f} | {copies:.0f} | {floor:.0f} | {fwd + bwd - floor:+.0f} "
            f"| {(fwd + bwd) / wall:.1%} |"
        )
    fw_mt, fw_fl = summ["mtmoe"]["framework_profiled_ms"], summ["floor"]["framework_profiled_ms"]
    lines.append(
        f"| {result['kinds']['framework']} | — | — | — | {fw_fl:.0f} | {fw_mt - fw_fl:+.0f} "
        f"| {fw_mt / wall:.1%} ({fw_mt:.0f} ms) |"
    )
    lines.append(
        f"| **profiled step** | | | | {prof['floor']['profiled_wall_ms']:.0f} "
        f"| {wall - prof['floor']['profiled_wall_ms']:+.0f} | 100% ({wall:.0f} ms) |"
    )
    lines += ["", "| op kind | mtmoe ms | floor ms | mtmoe − floor |", "|---|---:|---:|---:|"]
    for kind, label in result["kinds"].items():
        a, b = summ["mtmoe"]["kind_ms"].get(kind, 0.0), summ["floor"]["kind_ms"].get(kind, 0.0)
        lines.append(f"| {label} | {a:.0f} | {b:.0f} | {a - b:+.0f} |")
    blocks = result["setup"]["moe_blocks"]
    lines += [
        "",
        f"Per FFN block (a step's numbers ÷ {blocks}; framework time as profiled, profiler included):",
        "",
        "| part | op calls | op ms | Python/framework ms | floor: op calls, op ms, framework ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for part in BLOCK_PARTS:
        a, b = summ["mtmoe"]["per_block"][part], summ["floor"]["per_block"][part]
        lines.append(
            f"| {result['parts'][part]} | {a['op_calls']:.0f} | {a['op_ms']:.1f} | {a['framework_ms']:.1f} "
            f"| {b['op_calls']:.0f}, {b['op_ms']:.1f}, {b['framework_ms']:.1f} |"
        )
    un = result["unprofiled"]["median_wall_ms"]
    lines += [
        "",
        f"Without the profiler the step takes {un['mtmoe']:.0f} ms (floor {un['floor']:.0f} ms, "
        f"{un['mtmoe'] / un['floor']:.2f}×) wall time; of that, the ops' self time is "
        f"{summ['mtmoe']['op_self_ms']:.0f} ms (floor {summ['floor']['op_self_ms']:.0f} ms), which leaves "
        f"about {_estimate(summ['mtmoe']['framework_unprofiled_estimate_ms'])} of Python and framework "
        f"time (floor {_estimate(summ['floor']['framework_unprofiled_estimate_ms'])}). The mtmoe step calls "
        f"{summ['mtmoe']['op_calls_per_step']:.0f} ops from Python or autograd (floor "
        f"{summ['floor']['op_calls_per_step']:.0f}).",
    ]
    return "\n".join(lines)


MODE = cli.Mode(CLI, run, render_markdown, help="where the step's time goes, by part and op kind")
