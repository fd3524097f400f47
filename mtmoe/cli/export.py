"""Export a trained MoE-LoRA run as a Hugging Face model, scored against the base and the MoE.

    mtmoe-export --run runs/demo --out runs/demo/dense \
        [--task all|NAME] [--weights utilization|uniform|fade|task_gate] [--prune N [--prune-by random]] \
        [--merge average|task_arithmetic|ties|dare|breadcrumbs|adamerging [--lam L --density D ...]] \
        [--peft-rank R] [--no-metrics] [--rescore] [--stream]

(`python launch/export.py ...` is the same command.) What each option does, and what the export writes:
`mtmoe.export.pipeline`.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from mtmoe.runtime import configure_process, set_torch_threads

configure_process()

MERGE_FLAGS = ("lam", "density", "drop", "beta", "gamma")


def parse_args(argv: list[str] | None):
    """The command line."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", required=True, type=Path, help="the run directory (train.output_dir)")
    parser.add_argument("--out", required=True, type=Path, help="where to write the HF folder")
    parser.add_argument(
        "--task", default="all", help="weigh experts for this task's data (default: all tasks)"
    )
    parser.add_argument(
        "--weights",
        default="auto",
        help=(
            "expert weights: utilization|uniform|fade|task_gate (auto: task_gate for a run with "
            "moe.router=task_gate, fade for a run that faded, else utilization)"
        ),
    )
    parser.add_argument("--prune", type=int, default=0, help="keep only N experts per layer (0 = all)")
    parser.add_argument("--prune-by", default="utilization", help="which experts to keep: utilization|random")
    parser.add_argument(
        "--merge", default="average", help="average|task_arithmetic|ties|dare|breadcrumbs, or adamerging"
    )
    # A merge method's options (docs/deployment.md); a flag the chosen method does not take is refused.
    parser.add_argument(
        "--lam", type=float, default=None, help="λ of the summing methods (default 1/n, TIES 1)"
    )
    parser.add_argument("--density", type=float, default=None, help="TIES: fraction of entries kept (0.2)")
    parser.add_argument("--drop", type=float, default=None, help="DARE: drop rate (0.5)")
    parser.add_argument(
        "--beta", type=float, default=None, help="breadcrumbs: outlier fraction removed (0.01)"
    )
    parser.add_argument(
        "--gamma", type=float, default=None, help="breadcrumbs: small-entry fraction removed (0.8)"
    )
    parser.add_argument("--seed", type=int, default=0, help="DARE's masks and random pruning")
    parser.add_argument(
        "--ada-granularity", default="layer", help="AdaMerging: λ per layer, or per expert (task)"
    )
    parser.add_argument("--ada-steps", type=int, default=50, help="AdaMerging: Adam steps")
    parser.add_argument("--ada-lr", type=float, default=0.01, help="AdaMerging: learning rate")
    parser.add_argument("--ada-samples", type=int, default=16, help="AdaMerging: unlabelled inputs per task")
    parser.add_argument(
        "--peft-rank", type=int, default=0, help="also write per-task PEFT adapters of this rank"
    )
    parser.add_argument(
        "--no-metrics",
        action="store_true",
        help="skip the generated-answer metrics of the tasks that declared one (loss only)",
    )
    parser.add_argument(
        "--rescore",
        action="store_true",
        help="generate the MoE's answers here even when the run's eval.json already scored its final step",
    )
    parser.add_argument(
        "--stream",
        action="store_true",
        help=(
            "big models: write the export from the base's weight files one tensor at a time, never "
            "holding the base in memory; nothing is scored"
        ),
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    """Exports and returns the output folder."""
    args = parse_args(argv)

    from mtmoe.export.methods import MergeSpec, merge_method
    from mtmoe.export.pipeline import ExportConfig, export_run

    set_torch_threads()
    ada = args.merge == "adamerging"
    given = {k: getattr(args, k) for k in MERGE_FLAGS if getattr(args, k) is not None}
    if ada and given:
        raise ValueError(
            f"--{next(iter(given))}: AdaMerging learns its coefficients; it takes no merge option"
        )
    if not ada and "seed" in {f.name for f in dataclasses.fields(merge_method(args.merge).options)}:
        given["seed"] = args.seed
    spec = MergeSpec() if ada else MergeSpec.of(args.merge, **given)
    return export_run(
        ExportConfig(
            run=args.run,
            out=args.out,
            task=args.task,
            weights=args.weights,
            prune=args.prune,
            prune_by=args.prune_by,
            merge_spec=spec,
            adamerging=ada,
            seed=args.seed,
            ada_granularity=args.ada_granularity,
            ada_steps=args.ada_steps,
            ada_lr=args.ada_lr,
            ada_samples=args.ada_samples,
            peft_rank=args.peft_rank,
            metrics=not args.no_metrics,
            rescore=args.rescore,
            stream=args.stream,
        )
    )


if __name__ == "__main__":
    main()
