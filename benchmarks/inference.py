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
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from benchmarks import cli
from benchmarks.harness import machine_info, summarize, time_rounds, timing_settings, versions
from benchmarks.models import VOCAB, build_mtmoe, logit_forwards, perturb_lora_b, recipe
from benchmarks.tables import bold_if, table
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
SHAPES = ((4, 128), (1, 512))  # (batch, seq); the target is judged on the first, `--quick` times only it
SEED = 0  # of the LoRA B factors and of the tokens
CLI = cli.CliDefaults(
    cli.RESULTS / "inference.json", rounds=16, iters=1, warmup=1, quick=(2, 1, 1),
    quick_help="2 rounds of the first shape; prints only",
)  # fmt: skip


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


def build_models(seed: int, work: Path) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    """The base, the dense export (saved under `work`, reloaded) and the mtmoe model; the export's checks.

    The reloaded export's weights stay mapped from `work`, as a served model's are: keep it until done.
    """
    base = load_base_model(ensure_smollm2()).eval()
    moe = build_moe(seed)
    folded = export_dense(moe, work / "export")
    export = AutoModelForCausalLM.from_pretrained(work / "export").eval()
    return {BASELINE: base, "exported_dense": export, "moe_unmerged": moe}, check_export(
        base, export, folded, seed
    )


def time_shape(
    models: dict[str, nn.Module], batch: int, seq: int, args: argparse.Namespace
) -> dict[str, Any]:
    """Times the three no-grad forwards at one shape; returns medians, ratios and every round."""
    ids_BS = torch.randint(
        0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(SEED + batch * 1000 + seq)
    )
    moe = ("moe_unmerged", models["moe_unmerged"])
    steps = logit_forwards(
        {v: models[v] for v in VARIANTS[:2]}, moe, ids_BS, torch.zeros(batch, dtype=torch.long)
    )
    with torch.no_grad():
        per_round_ms = time_rounds(steps, args.rounds, args.iters, args.warmup, scale=1e3)
    # median_ms, ratio_to_base, median_per_round_ratio_to_base
    return {
        "batch": batch,
        "seq": seq,
        "tokens": batch * seq,
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


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Builds, checks and times the variants at every shape; returns the result record."""
    torch.set_num_threads(1)
    wall0 = time.perf_counter()
    timed = SHAPES[:1] if args.quick else SHAPES
    with tempfile.TemporaryDirectory(prefix="mtmoe-inference-bench-") as work:
        models, checks = build_models(SEED, Path(work))
        build_s = time.perf_counter() - wall0
        print(f"export checks: {checks}", flush=True)
        shapes = {f"{b}x{s}": time_shape(models, b, s, args) for b, s in timed}
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
            "seed": SEED,
            "shapes": list(shapes),
        },
        "timing": timing_settings(args.rounds, args.iters, args.warmup, build_wall_s=build_s),
        "export_checks": checks,
        "shapes": shapes,
        "target": target_record(shapes),
        "wall_s": time.perf_counter() - wall0,
    }


def shape_table(summary: Mapping[str, Any]) -> str:
    """One shape's table: median forward ms and the ratios to the base."""
    ms = summary["median_ms"]
    per_round, of_medians = summary["median_per_round_ratio_to_base"], summary["ratio_to_base"]
    rows = [
        [
            LABELS.get(v, v),
            f"{ms[v]:.0f}",
            bold_if(f"{per_round[v]:.3f}", v == TARGET_VARIANT),
            f"{of_medians[v]:.3f}",
        ]
        for v in ms
    ]
    return table(["variant", "ms", "× base", "× base (ratio of medians)"], rows, "lrrr")


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


MODE = cli.Mode(CLI, run, render_markdown)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return cli.main(__doc__.splitlines()[0], MODE, argv)


if __name__ == "__main__":
    main()
