"""Peak memory of a training step of the real SmolLM2-135M: mtmoe against full fine-tuning with AdamW.

fp32, CPU, one thread. Each variant runs in a fresh process (`--child`) that imports the same modules,
builds its model and takes two AdamW steps, so the optimizer state exists while the second step peaks.
The peak is the child's `getrusage(RUSAGE_SELF).ru_maxrss` (and `VmHWM`); the parent imports nothing
heavy before the children run. Step memory is the peak less the RSS after the imports. Each (shape,
variant) runs `--repeats` times, interleaved; medians. benchmarks/README.md lists the variants and shapes.

    OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.memory [--quick]

Importing this module is cheap (standard library only); torch and the models load in the children.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import cli
from benchmarks.tables import bold_if, table

REPO = Path(__file__).resolve().parent.parent
LOSS_FRACTION = 0.25
STEPS = 2
LR = 5e-4  # the demo recipe's; the value does not change the memory
BASELINE = "full_ft_adamw"
VARIANTS = (
    BASELINE,
    "full_ft_grad_ckpt",
    "mtmoe",
    "mtmoe_grad_ckpt",
    "mtmoe_bf16_base_grad_ckpt",
    "peft_lora_r16",
    "idle",
)
# `--quick` (the smoke test) runs one variant per builder, the one that takes every option of it.
QUICK_VARIANTS = (BASELINE, "mtmoe_bf16_base_grad_ckpt", "peft_lora_r16", "idle")
TARGET_VARIANTS, TARGET_RATIO = ("mtmoe", "mtmoe_grad_ckpt", "mtmoe_bf16_base_grad_ckpt"), 0.35
CHILD_TAG = "MEMORY_BENCH_RESULT "
MIB = 1024 * 1024
LABELS = {
    BASELINE: "full fine-tuning, AdamW (baseline)",
    "full_ft_grad_ckpt": "full fine-tuning with gradient checkpointing",
    "mtmoe": "**mtmoe** 4 experts, top-2, r8 (LM head only at targets)",
    "mtmoe_grad_ckpt": "**mtmoe with gradient checkpointing**",
    "mtmoe_bf16_base_grad_ckpt": "**mtmoe with checkpointing, frozen base stored in bf16** (fp32 compute)",
    "peft_lora_r16": "PEFT LoRA r16 on gate/up/down",
    "idle": "idle: imports + base model loaded and paged in, no step",
}


@dataclass(frozen=True)
class Shape:
    """One batch shape, the variants measured at it and the environment of their processes.

    Attributes:
        batch: Rows.
        seq: Tokens per row.
        variants: The variants, in run order.
        env: Environment variables set in the children (on top of the parent's and `--child-env`).
        tag: Names the environment in the shape's key.
    """

    batch: int
    seq: int
    variants: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    tag: str = ""

    @property
    def name(self) -> str:
        """The shape's key in the result, e.g. `4x128` or `4x128-malloc_mmap_1MiB`."""
        return f"{self.batch}x{self.seq}" + (f"-{self.tag}" if self.tag else "")


# glibc serves blocks from its heap up to a threshold that grows (to 32 MiB) as large blocks are freed,
# and keeps freed heap memory resident; a fixed 1 MiB threshold gives every block of 1 MiB or more its
# own mapping, returned to the OS on free, so the peak RSS follows the live tensors more closely.
MMAP_1MIB = (("MALLOC_MMAP_THRESHOLD_", str(1 << 20)),)
SHAPES = (
    Shape(4, 128, VARIANTS),
    Shape(
        4,
        128,
        (BASELINE, "mtmoe", "mtmoe_grad_ckpt", "mtmoe_bf16_base_grad_ckpt", "peft_lora_r16"),
        MMAP_1MIB,
        "malloc_mmap_1MiB",
    ),
    Shape(8, 512, (BASELINE, "full_ft_grad_ckpt", "mtmoe", "mtmoe_grad_ckpt", "mtmoe_bf16_base_grad_ckpt")),
    Shape(
        8,
        512,
        (BASELINE, "full_ft_grad_ckpt", "mtmoe_grad_ckpt", "mtmoe_bf16_base_grad_ckpt"),
        MMAP_1MIB,
        "malloc_mmap_1MiB",
    ),
)


# ------------------------------------------------------------------------------------------ child


def current_rss_bytes() -> int:
    """The process's resident set size now, from `/proc/self/statm`."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """The process's peak resident set size, `getrusage(RUSAGE_SELF).ru_maxrss` (KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def vm_hwm_bytes() -> int:
    """`VmHWM` of `/proc/self/status`: the peak RSS of this process's own address space."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM")


def rss_snapshot() -> dict[str, float]:
    """Current and peak RSS in MiB."""
    return {"rss_mib": current_rss_bytes() / MIB, "peak_mib": peak_rss_bytes() / MIB}


def import_stack() -> None:
    """Imports what every child imports, whatever its variant, so the fixed cost is the same."""
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401

    import benchmarks.models  # noqa: F401  (imports mtmoe, and with it deepspeed)

    torch.set_num_threads(1)


def make_batch(batch: int, seq: int, seed: int) -> dict[str, Any]:
    """Seeded random tokens, no padding, a fixed random loss mask (~25%, never position 0), one task."""
    from benchmarks.models import VOCAB, random_batch

    return random_batch(batch, seq, VOCAB, LOSS_FRACTION, seed)


@dataclass
class Trainee:
    """A variant's model, what it trains and its loss on a batch.

    Attributes:
        model: The model.
        loss: From the batch, the scalar loss to backpropagate.
    """

    model: Any
    loss: Callable[[dict[str, Any]], Any]

    def trainable(self) -> list[Any]:
        """The parameters the optimizer updates."""
        return [p for p in self.model.parameters() if p.requires_grad]


def hf_loss(model: Any) -> Callable[[dict[str, Any]], Any]:
    """The standard HF causal-LM loss of `model` (labels -100 off the mask)."""

    def loss(b: dict[str, Any]) -> Any:
        return model(
            input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"], use_cache=False
        ).loss

    return loss


def base_model(tiny: bool) -> Any:
    """The recipe's frozen base model as transformers loads it (SmolLM2-135M, or the tiny Llama)."""
    from benchmarks.models import VOCAB, recipe
    from mtmoe.model.moe_lm import build_base

    return build_base(recipe(tiny), VOCAB)


def build_full_ft(tiny: bool, grad_ckpt: bool = False) -> Trainee:
    """The plain HF base model with every parameter trainable (and HF's gradient checkpointing)."""
    model = base_model(tiny).train()
    for p in model.parameters():
        p.requires_grad_(True)
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return Trainee(model, hf_loss(model))


def build_peft(tiny: bool) -> Trainee:
    """The base model with one plain rank-16 LoRA on every FFN projection."""
    from benchmarks.models import build_peft, recipe

    model = build_peft(recipe(tiny))
    return Trainee(model, hf_loss(model))


def build_mtmoe(tiny: bool, grad_ckpt: bool, frozen_dtype: str = "float32") -> Trainee:
    """The demo recipe's mtmoe model; `grad_ckpt` and `frozen_dtype` set the recipe's keys of those names."""
    from benchmarks.models import build_mtmoe, recipe

    ckpt = str(grad_ckpt).lower()
    model = build_mtmoe(
        recipe(tiny, [f"model.gradient_checkpointing={ckpt}", f"model.frozen_dtype={frozen_dtype}"])
    )

    def loss(b: dict[str, Any]) -> Any:
        loss_BS, aux = model(b["input_ids"], b["attention_mask"], b["loss_mask"], b["task_ids"])
        return loss_BS.sum() / b["loss_mask"].sum() + aux  # aux comes weighted by the recipe's coefs

    return Trainee(model, loss)


BUILDERS: dict[str, Callable[[bool], Trainee]] = {
    BASELINE: build_full_ft,
    "full_ft_grad_ckpt": lambda tiny: build_full_ft(tiny, grad_ckpt=True),
    "mtmoe": lambda tiny: build_mtmoe(tiny, grad_ckpt=False),
    "mtmoe_grad_ckpt": lambda tiny: build_mtmoe(tiny, grad_ckpt=True),
    "mtmoe_bf16_base_grad_ckpt": lambda tiny: build_mtmoe(tiny, grad_ckpt=True, frozen_dtype="bfloat16"),
    "peft_lora_r16": build_peft,
    "idle": build_full_ft,
}


def page_in(trainee: Trainee) -> None:
    """Reads every parameter once, so that the whole model is resident.

    The loaded weights are mapped from the safetensors file lazily: until touched they are not resident
    (a step touches them all).
    """
    import torch

    with torch.no_grad():
        for p in trainee.model.parameters():
            p.sum()


def tensor_bytes(trainee: Trainee, optimizer: Any | None) -> dict[str, int]:
    """Bytes of the parameters (all, trainable), of the grads held now and of the AdamW state."""
    params = list(trainee.model.parameters())
    state = optimizer.state.values() if optimizer is not None else []
    return {
        "params": sum(p.numel() * p.element_size() for p in params),
        "trainable_params": sum(p.numel() * p.element_size() for p in trainee.trainable()),
        "grads": sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None),
        "optimizer_state": sum(
            t.numel() * t.element_size() for s in state for t in s.values() if hasattr(t, "numel")
        ),
    }


def train_steps(trainee: Trainee, batch: dict[str, Any], steps: int) -> tuple[Any, list[dict[str, float]]]:
    """`steps` AdamW steps; per step its CPU seconds, loss and RSS after it."""
    import torch

    optimizer = torch.optim.AdamW(trainee.trainable(), lr=LR)
    records = []
    for _ in range(steps):
        t0 = time.process_time()
        optimizer.zero_grad(set_to_none=True)
        loss = trainee.loss(batch)
        loss.backward()
        optimizer.step()
        cpu_s = time.process_time() - t0
        records.append({"cpu_s": cpu_s, "loss": loss.item(), **rss_snapshot()})
    return optimizer, records


def measure(variant: str, batch: int, seq: int, seed: int, tiny: bool = False) -> dict[str, Any]:
    """One variant in this (fresh) process: imports, build, steps; RSS along the way and at the peak."""
    import_stack()
    import torch

    stages = {"after_import": rss_snapshot()}
    torch.manual_seed(seed)
    data = make_batch(batch, seq, seed)
    trainee = BUILDERS[variant](tiny)
    stages["after_build"] = rss_snapshot()
    if variant == "idle":
        page_in(trainee)
        stages["after_page_in"] = rss_snapshot()
    optimizer, steps = (None, []) if variant == "idle" else train_steps(trainee, data, STEPS)
    return {
        "variant": variant,
        "batch": batch,
        "seq": seq,
        "peak_rss_mib": peak_rss_bytes() / MIB,
        # What the model and its training add to the process: the peak less the RSS after the imports
        # (the libraries' code and data, the same in every variant): the analogue of a GPU's memory
        # allocated, which holds tensors only.
        "step_mib": peak_rss_bytes() / MIB - stages["after_import"]["rss_mib"],
        "vm_hwm_mib": vm_hwm_bytes() / MIB,
        "step_cpu_s": steps[-1]["cpu_s"] if steps else None,
        "steps": steps,
        "stages": stages,
        "tensor_mib": {k: v / MIB for k, v in tensor_bytes(trainee, optimizer).items()},
        "target_tokens": int(data["loss_mask"].sum()),
    }


# ------------------------------------------------------------------------------------------ parent


def run_child(
    variant: str, shape: Shape, seed: int, env: Mapping[str, str], tiny: bool = False
) -> dict[str, Any]:
    """Runs one variant in a fresh interpreter and returns its record (with the child's wall time).

    Args:
        variant: The variant.
        shape: The batch shape.
        seed: Seed of the tokens and of the adapters' initialisation.
        env: Environment variables set for the child on top of this process's.
        tiny: The smoke test's tiny random Llama instead of SmolLM2.
    """
    cmd = [sys.executable, "-m", "benchmarks.memory", "--child", variant]
    cmd += ["--batch", str(shape.batch), "--seq", str(shape.seq), "--seed", str(seed)]
    cmd += ["--tiny"] if tiny else []
    t0 = time.perf_counter()
    env = {**os.environ, **env, **dict(shape.env)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    wall_s = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(CHILD_TAG)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{variant} at {shape.name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return {**json.loads(lines[-1][len(CHILD_TAG) :]), "wall_s": wall_s}


def run_shape(
    shape: Shape, repeats: int, seed: int, env: Mapping[str, str], tiny: bool = False
) -> dict[str, list[dict[str, Any]]]:
    """Every variant of `shape` `repeats` times, interleaved (all variants once, then again)."""
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in shape.variants}
    for r in range(repeats):
        for variant in shape.variants:
            rec = run_child(variant, shape, seed, env, tiny)
            runs[variant].append(rec)
            step = "" if rec["step_cpu_s"] is None else f", step {rec['step_cpu_s']:.2f} s CPU"
            print(
                f"[{shape.name} {r + 1}/{repeats}] {variant:<16} peak {rec['peak_rss_mib']:7.0f} MiB{step} "
                f"({rec['wall_s']:.0f} s)",
                flush=True,
            )
    return runs


def median_of(records: Sequence[Mapping[str, Any]], key: str) -> float | None:
    values = [r[key] for r in records if r[key] is not None]
    return statistics.median(values) if values else None


def summarize_shape(shape: Shape, runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
    """Medians per variant, ratios to the baseline, and the raw numbers of every run."""
    peak = {v: median_of(runs[v], "peak_rss_mib") for v in shape.variants}
    step_mib = {v: median_of(runs[v], "step_mib") for v in shape.variants}
    step = {v: median_of(runs[v], "step_cpu_s") for v in shape.variants}
    summary: dict[str, Any] = {
        "batch": shape.batch,
        "seq": shape.seq,
        "tokens": shape.batch * shape.seq,
        "env": dict(shape.env),
        "target_tokens": runs[shape.variants[0]][0]["target_tokens"],
        "median_peak_rss_mib": peak,
        "median_vm_hwm_mib": {v: median_of(runs[v], "vm_hwm_mib") for v in shape.variants},
        f"peak_ratio_to_{BASELINE}": {v: peak[v] / peak[BASELINE] for v in shape.variants},
        "median_step_mib": step_mib,
        f"step_mib_ratio_to_{BASELINE}": {v: step_mib[v] / step_mib[BASELINE] for v in shape.variants},
        "median_step_cpu_s": step,
        "tensor_mib": {v: runs[v][0]["tensor_mib"] for v in shape.variants},
        "runs": {v: list(runs[v]) for v in shape.variants},
    }
    if "mtmoe_grad_ckpt" in peak and "mtmoe" in peak:
        summary["grad_ckpt_vs_mtmoe"] = {
            "peak_ratio": peak["mtmoe_grad_ckpt"] / peak["mtmoe"],
            "step_cpu_ratio": step["mtmoe_grad_ckpt"] / step["mtmoe"],
        }
    return summary


def target_record(shapes: Mapping[str, Any]) -> dict[str, Any] | None:
    """Issue #8's memory target at every shape that measured full FT and mtmoe (None if none did).

    Judged strictly on the whole process's peak RSS, for mtmoe with and without gradient checkpointing
    (met at a shape when either is at or under the bound); the step-memory ratio (the peak above the
    imports) is reported beside it. The issue names no batch shape, so each is reported as measured.
    """
    by_shape = {}
    for name, summary in shapes.items():
        ratios = summary[f"peak_ratio_to_{BASELINE}"]
        variants = [v for v in TARGET_VARIANTS if v in ratios]
        if BASELINE not in ratios or not variants:
            continue
        best = min(variants, key=ratios.get)
        by_shape[name] = {
            "best_variant": best,
            "peak_ratio": {v: ratios[v] for v in variants},
            "step_mib_ratio": {v: summary[f"step_mib_ratio_to_{BASELINE}"][v] for v in variants},
            "ratio": ratios[best],
            "met": ratios[best] <= TARGET_RATIO,
        }
    if not by_shape:
        return None
    return {
        "what": f"mtmoe peak RSS / {BASELINE} peak RSS",
        "bound": TARGET_RATIO,
        "by_shape": by_shape,
        "met_at": [name for name, t in by_shape.items() if t["met"]],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Runs every shape's variants in fresh processes; returns the result record.

    `--quick` runs `QUICK_VARIANTS` at 4x128 once.
    """
    known = {s.name: s for s in SHAPES}
    names = [n.strip() for n in args.shapes.split(",") if n.strip()]
    if unknown := [n for n in names if n not in known]:
        raise SystemExit(f"--shapes: unknown {unknown}; choose from {', '.join(known)}")
    if bad := [item for item in args.child_env if "=" not in item or not item.partition("=")[0]]:
        raise SystemExit(f"--child-env: expected KEY=VALUE, got {bad}")
    env = dict(item.split("=", 1) for item in args.child_env)
    quick = [Shape(SHAPES[0].batch, SHAPES[0].seq, QUICK_VARIANTS)]
    shapes, repeats = (quick, 1) if args.quick else ([known[n] for n in names], args.repeats)
    seed, tiny = args.seed, args.tiny
    t0 = time.perf_counter()
    measured = {s.name: summarize_shape(s, run_shape(s, repeats, seed, env, tiny)) for s in shapes}
    from benchmarks.harness import machine_info, versions  # imports torch: only after the children ran
    from benchmarks.models import PEFT_LORA

    return {
        "benchmark": f"{'tiny random Llama (smoke test)' if tiny else 'SmolLM2-135M-Instruct'} peak RSS of a "
        "training step (2 AdamW steps), fp32, CPU",
        "machine": machine_info(),
        "versions": versions(),
        "settings": {
            "recipe": "launch/recipes/demo.yaml",
            "tiny": tiny,
            "steps_per_process": STEPS,
            "optimizer": f"torch.optim.AdamW(lr={LR}), defaults otherwise",
            "loss_fraction": LOSS_FRACTION,
            "peft_lora": PEFT_LORA,
            "dtype": "float32",
            "repeats": repeats,
            "order": "interleaved: every variant of a shape once per repeat, in a fresh process each",
            "peak": "resource.getrusage(RUSAGE_SELF).ru_maxrss of the child process",
            "step_time": "time.process_time of the second step (zero_grad, forward, backward, AdamW step)",
            "seed": seed,
            "child_env": dict(env),
        },
        "shapes": measured,
        "target": target_record(measured),
        "wall_s": time.perf_counter() - t0,
    }


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def shape_table(summary: Mapping[str, Any]) -> str:
    """One shape's table: peak RSS, step memory (peak above the imports), ratios and step CPU time."""
    peak, step = summary["median_peak_rss_mib"], summary["median_step_cpu_s"]
    ratio = summary[f"peak_ratio_to_{BASELINE}"]
    step_mib = summary.get("median_step_mib", {})
    step_ratio = summary.get(f"step_mib_ratio_to_{BASELINE}", {})
    rows = [
        [LABELS.get(v, v), f"{peak[v]:.0f}", bold_if(f"{ratio[v]:.2f}", v in TARGET_VARIANTS),
         _fmt(step_mib.get(v), ".0f"), _fmt(step_ratio.get(v), ".2f"), _fmt(step[v], ".2f")]
        for v in peak
    ]  # fmt: skip
    header = ["variant", "peak RSS MiB", "× full FT", "step MiB (peak − imports)", "× full FT", "step CPU s"]
    return table(header, rows, "lrrrrr")


def grad_ckpt_line(summary: Mapping[str, Any]) -> str:
    """What gradient checkpointing does to mtmoe's peak and step time at one shape."""
    g = summary.get("grad_ckpt_vs_mtmoe")
    if g is None:
        return ""
    return (
        f"Gradient checkpointing: {g['peak_ratio']:.2f}× mtmoe's peak RSS, "
        f"{g['step_cpu_ratio']:.2f}× its step CPU time."
    )


def render_markdown(result: Mapping[str, Any]) -> str:
    """The README tables (one per shape) and the target line, from a result record; no I/O."""
    settings, parts = result["settings"], []
    for summary in result["shapes"].values():
        env = "".join(f", with `{k}={v}`" for k, v in summary.get("env", {}).items())
        head = (
            f"**{summary['batch']} × {summary['seq']} tokens** ({summary['target_tokens']} carry loss){env}; "
            f"median of {settings['repeats']} fresh processes each:"
        )
        parts += [head, shape_table(summary)]
        line = grad_ckpt_line(summary)
        if line:
            parts.append(line)
    target = result.get("target")
    if target is not None:
        items = []
        for name, t in target["by_shape"].items():
            best = t["best_variant"]
            verdict = "met" if t["met"] else "not met"
            items.append(
                f"{name}: {t['ratio']:.2f} ({LABELS.get(best, best).replace('**', '')}; step memory "
                f"{t['step_mib_ratio'][best]:.2f}): **{verdict}**"
            )
        parts.append(
            f"Target (issue #8): {target['what']} ≤ {target['bound']:.2f}. " + "; ".join(items) + "."
        )
    return "\n\n".join(parts)


def arguments(p: argparse.ArgumentParser) -> None:
    """`--repeats`, `--shapes`, `--seed`, `--child-env`."""
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per variant and shape")
    names = ",".join(s.name for s in SHAPES)
    p.add_argument("--shapes", default=names, help=f"comma-separated, from: {names}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--child-env", action="append", default=[], metavar="KEY=VALUE",
        help="set in every child's environment (repeatable), e.g. MALLOC_MMAP_THRESHOLD_=1048576",
    )  # fmt: skip


CLI = cli.CliDefaults(
    cli.RESULTS / "memory.json", quick_help="4 of the variants once at 4x128; prints only", tiny=True
)
MODE = cli.Mode(CLI, run, render_markdown, arguments=arguments)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Runs the benchmark; with `--child VARIANT` (internal) measures one variant in this process."""
    child = argparse.ArgumentParser()
    child.add_argument("--child", choices=VARIANTS)
    for flag in ("--batch", "--seq", "--seed"):
        child.add_argument(flag, type=int)
    child.add_argument("--tiny", action="store_true")
    known, _ = child.parse_known_args(argv)
    if known.child is None:
        return cli.main(__doc__.splitlines()[0], MODE, argv)
    print(CHILD_TAG + json.dumps(measure(known.child, known.batch, known.seq, known.seed, known.tiny)))
    return None


if __name__ == "__main__":
    main()
