"""Inference cost of an mtmoe model: the dense export against the base model, and the unmerged MoE.

Forward only (no grad), full-vocabulary logits, fp32, one CPU thread, on SmolLM2-135M-Instruct and seeded
random tokens. `base` is the HF base model; `exported_dense` the demo recipe's model with random LoRA B
factors, folded by `fold_to_dense`, saved by `save_dense` and loaded back with plain transformers;
`moe_unmerged` the routed MoE-LoRA model. Before timing, the export is asserted to be a merge in the base
architecture (class, config, names, shapes; only the FFN projections differ; reloaded logits equal).

    OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.inference [--quick]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from benchmarks import cli
from benchmarks.harness import machine_info, summarize, time_rounds, timing_settings, versions
from benchmarks.models import VOCAB, build_mtmoe, moe_logits, perturb_lora_b, recipe
from mtmoe.export.dense import fold_to_dense, save_dense
from mtmoe.model.base import ensure_smollm2, load_base_model, load_tokenizer

BASELINE = "base"
VARIANTS = (BASELINE, "exported_dense", "moe_unmerged")
TARGET_VARIANT, TARGET_CENTER, TARGET_TOL = "exported_dense", 1.0, 0.03
LABELS = {
    BASELINE: "base model (baseline)",
    "exported_dense": "**dense export** (`fold_to_dense` + `save_dense`, reloaded with plain transformers)",
    "moe_unmerged": "unmerged mtmoe MoE-LoRA (top-2 of 4, r8)",
}


@dataclass(frozen=True)
class Shape:
    """One timed input shape.

    Attributes:
        batch: Rows.
        seq: Tokens per row.
    """

    batch: int
    seq: int

    @property
    def name(self) -> str:
        """The shape's key in the result, e.g. `4x128`."""
        return f"{self.batch}x{self.seq}"


SHAPES = (Shape(4, 128), Shape(1, 512))


@dataclass(frozen=True)
class Settings:
    """How the benchmark times.

    Attributes:
        shapes: The timed shapes; the target is judged on the first.
        rounds: Interleaved rounds per shape.
        warmup: Untimed forwards per variant before the first round of a shape.
        seed: Seed of the LoRA B factors and of the tokens.
    """

    shapes: tuple[Shape, ...] = SHAPES
    rounds: int = 16
    warmup: int = 1
    seed: int = 0


QUICK = Settings(shapes=SHAPES[:1], rounds=2)


@dataclass
class Models:
    """The three models, built once.

    Attributes:
        base: The base HF model.
        export: The dense export, reloaded from disk with plain transformers.
        moe: The unmerged mtmoe model (an `MoELM`).
        checks: What `check_export` found.
    """

    base: nn.Module
    export: nn.Module
    moe: nn.Module
    checks: dict[str, Any]


def build_moe(seed: int) -> nn.Module:
    """The demo recipe's mtmoe model, its LoRA B factors given small random values, in eval mode."""
    model = build_mtmoe(recipe())
    perturb_lora_b(model, seed)
    return model.eval()


def export_dense(moe: nn.Module, out: Path) -> nn.Module:
    """Folds a copy of `moe` with mtmoe's export, saves it to `out` and returns the in-memory fold."""
    folded = fold_to_dense(copy.deepcopy(moe), shares=None)  # equal expert shares
    save_dense(folded, load_tokenizer(ensure_smollm2()), out)
    return folded.eval()


def check_export(base: nn.Module, export: nn.Module, folded: nn.Module, seed: int) -> dict[str, Any]:
    """Asserts that `export` is a merge in the base architecture (see the module docstring).

    Args:
        base: The base model.
        export: The reloaded export.
        folded: The in-memory folded model that was saved.
        seed: Seed of the probe tokens.

    Returns:
        The class, parameter count, how many tensors differ from the base (and by how much), and the
        largest logit difference between the reloaded and the in-memory export.
    """
    base_sd, export_sd = base.state_dict(), export.state_dict()
    assert type(export) is type(base), (type(export), type(base))
    assert _same_config(base, export)
    assert export.config._attn_implementation == base.config._attn_implementation
    assert {k: v.shape for k, v in export_sd.items()} == {k: v.shape for k, v in base_sd.items()}
    n_base, n_export = (sum(p.numel() for p in m.parameters()) for m in (base, export))
    assert n_export == n_base, (n_export, n_base)
    assert all(p.dtype == torch.float32 for p in export.parameters())
    changed = {k: (export_sd[k] - base_sd[k]).abs().max().item() for k in base_sd}
    changed = {k: d for k, d in changed.items() if d > 0}
    ffn = [k for k in base_sd if k.endswith(("gate_proj.weight", "up_proj.weight", "down_proj.weight"))]
    assert sorted(changed) == sorted(ffn), f"changed {len(changed)} tensors, expected the {len(ffn)} FFNs"
    ids_BS = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        reload_diff = (export(input_ids=ids_BS).logits - folded(input_ids=ids_BS).logits).abs().max().item()
    assert reload_diff < 1e-4, reload_diff
    return {
        "model_class": type(export).__name__,
        "attn_implementation": export.config._attn_implementation,
        "params": n_export,
        "tensors": len(base_sd),
        "tensors_changed": len(changed),
        "changed_max_abs_diff": max(changed.values()),
        "changed_min_of_max_abs_diff": min(changed.values()),
        "reloaded_vs_in_memory_max_abs_logit_diff": reload_diff,
    }


def _same_config(base: nn.Module, export: nn.Module) -> bool:
    """The configs agree on every architecture field (names, paths and versions aside)."""
    skip = {"_name_or_path", "_model_name_or_path", "transformers_version", "architectures", "dtype"}
    a, b = ({k: v for k, v in m.config.to_dict().items() if k not in skip} for m in (base, export))
    return a == b


def build_models(seed: int, work: Path) -> Models:
    """Builds the base, the mtmoe model and its dense export (saved under `work`, reloaded), and checks them.

    The reloaded export's weights stay mapped from `work`, as a served model's are: keep it until done.
    """
    base = load_base_model(ensure_smollm2()).eval()
    moe = build_moe(seed)
    folded = export_dense(moe, work / "export")
    export = AutoModelForCausalLM.from_pretrained(work / "export").eval()
    checks = check_export(base, export, folded, seed)
    return Models(base=base, export=export, moe=moe, checks=checks)


def forwards(models: Models, ids_BS: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    """One no-grad forward per variant, each returning full-vocabulary logits."""
    attn_BS = torch.ones_like(ids_BS)
    task_B = torch.zeros(ids_BS.shape[0], dtype=torch.long)

    def dense(lm: nn.Module) -> Callable[[], torch.Tensor]:
        return lambda: lm(input_ids=ids_BS, attention_mask=attn_BS, use_cache=False).logits

    return {
        BASELINE: dense(models.base),
        "exported_dense": dense(models.export),
        "moe_unmerged": lambda: moe_logits(models.moe, ids_BS, attn_BS, task_B),
    }


def time_shape(models: Models, shape: Shape, s: Settings) -> dict[str, Any]:
    """Times the three forwards at one shape; returns medians, ratios and every round."""
    gen = torch.Generator().manual_seed(s.seed + shape.batch * 1000 + shape.seq)
    ids_BS = torch.randint(0, VOCAB, (shape.batch, shape.seq), generator=gen)
    with torch.no_grad():
        per_round_ms = time_rounds(forwards(models, ids_BS), s.rounds, 1, s.warmup, scale=1e3)
    # median_ms, ratio_to_base, median_per_round_ratio_to_base
    return {
        "batch": shape.batch,
        "seq": shape.seq,
        "tokens": shape.batch * shape.seq,
        **summarize(per_round_ms, BASELINE, "ms"),
        "per_round_ms": per_round_ms,
    }


def target_record(shapes: Mapping[str, Any]) -> dict[str, Any]:
    """Issue #8's inference target, judged at the first shape on the median of per-round ratios."""
    first = next(iter(shapes.values()))
    ratio = first[f"median_per_round_ratio_to_{BASELINE}"][TARGET_VARIANT]
    return {
        "what": f"{TARGET_VARIANT} / {BASELINE} forward CPU time at {first['batch']}x{first['seq']} "
        "(median of per-round ratios)",
        "center": TARGET_CENTER,
        "tolerance": TARGET_TOL,
        "ratio": ratio,
        "met": abs(ratio - TARGET_CENTER) <= TARGET_TOL,
        "moe_unmerged_ratio": first[f"median_per_round_ratio_to_{BASELINE}"]["moe_unmerged"],
    }


def run(s: Settings) -> dict[str, Any]:
    """Builds, checks and times the variants at every shape; returns the result record."""
    torch.set_num_threads(1)
    wall0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mtmoe-inference-bench-") as work:
        models = build_models(s.seed, Path(work))
        build_s = time.perf_counter() - wall0
        print(f"export checks: {models.checks}", flush=True)
        shapes = {shape.name: time_shape(models, shape, s) for shape in s.shapes}
    return {
        "benchmark": "SmolLM2-135M-Instruct forward (no grad, full-vocabulary logits), fp32, CPU",
        "machine": machine_info(),
        "versions": versions(),
        "settings": {
            "recipe": "launch/recipes/demo.yaml",
            "export": "fold_to_dense(shares=None: equal expert shares) + save_dense, reloaded with "
            "AutoModelForCausalLM.from_pretrained",
            "lora_b": "random normal x 0.02 (benchmarks.models.perturb_lora_b)",
            "dtype": "float32",
            "seed": s.seed,
            "shapes": [shape.name for shape in s.shapes],
        },
        "timing": {**timing_settings(s.rounds, 1, s.warmup), "build_wall_s": build_s},
        "export_checks": models.checks,
        "shapes": shapes,
        "target": target_record(shapes),
        "wall_s": time.perf_counter() - wall0,
    }


def shape_table(summary: Mapping[str, Any]) -> str:
    """One shape's table: median forward ms and the ratios to the base."""
    ms = summary["median_ms"]
    per_round, of_medians = summary["median_per_round_ratio_to_base"], summary["ratio_to_base"]
    lines = ["| variant | ms | × base | × base (ratio of medians) |", "|---|---:|---:|---:|"]
    for v in ms:
        bold = "**" if v == TARGET_VARIANT else ""
        cells = [LABELS.get(v, v), f"{ms[v]:.0f}", f"{bold}{per_round[v]:.3f}{bold}", f"{of_medians[v]:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_markdown(result: Mapping[str, Any]) -> str:
    """The README tables (one per shape) and the target line, from a result record; no I/O."""
    rounds, parts = result["timing"]["rounds"], []
    for summary in result["shapes"].values():
        parts.append(
            f"**{summary['batch']} × {summary['seq']} tokens**, no grad, full-vocabulary logits, median of "
            f"{rounds} interleaved rounds (× base: median of per-round ratios):"
        )
        parts.append(shape_table(summary))
    t, c = result["target"], result["export_checks"]
    verdict = "met" if t["met"] else "not met"
    parts.append(
        f"The export is a `{c['model_class']}` with the base's {c['params']:,} parameters; "
        f"{c['tensors_changed']} of its {c['tensors']} tensors (the FFN projections) differ from the base. "
        f"Target (issue #8): dense export = {t['center']:.2f} ± {t['tolerance']:.2f}× the base; measured "
        f"{t['ratio']:.3f}: **{verdict}**. The unmerged MoE costs {t['moe_unmerged_ratio']:.2f}× the base."
    )
    return "\n\n".join(parts)


def arguments(p: argparse.ArgumentParser) -> None:
    """`--rounds`, `--warmup` and `--seed` over the defaults of `Settings`."""
    p.add_argument("--rounds", type=int, default=None, help=f"default {Settings.rounds}")
    p.add_argument("--warmup", type=int, default=None, help=f"default {Settings.warmup}")
    p.add_argument("--seed", type=int, default=None, help=f"default {Settings.seed}")


def run_mode(args: argparse.Namespace) -> dict[str, Any]:
    """`run` with the settings of the command line (`--quick`: 2 rounds of the first shape)."""
    s = QUICK if args.quick else Settings()
    overrides = {"rounds": args.rounds, "warmup": args.warmup, "seed": args.seed}
    result = run(dataclasses.replace(s, **{k: v for k, v in overrides.items() if v is not None}))
    print(f"{result['wall_s'] / 60:.1f} min wall")
    return result


CLI = cli.CliDefaults(cli.RESULTS / "inference.json", quick_help="2 rounds of the first shape; prints only")
MODE = cli.Mode(CLI, run_mode, render_markdown, arguments=arguments)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return cli.main(__doc__.splitlines()[0], MODE, argv)


if __name__ == "__main__":
    main()
