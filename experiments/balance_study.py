"""The multitask-balancing study: the same budget on the demo tasks under each loss/sampling scheme.

    OMP_NUM_THREADS=1 .venv/bin/python -m experiments.balance_study [--steps 50] [--nproc 2]
    ... --only coba famo --update      # rerun some schemes, keep the others' results in the JSON
    ... --quick --data DIR --json X    # the smoke test: a tiny random Llama, 2 steps, 1 process

The study is data (`balance_study.yaml`): the recipe, the overrides every run shares and the schemes.
The demo mix is imbalanced by itself (docstring has about 20× the training samples of codegen). Each
scheme trains the recipe (2 processes, DeepSpeed ZeRO-2) for the same number of steps and reports the
held-out token loss per task and the worst task's loss, written to `results/balance_study.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from benchmarks.cli import TINY_OVERRIDES, write_result
from benchmarks.tables import bold_if, paragraph, table
from mtmoe.parallel.dist import free_port

ROOT = Path(__file__).resolve().parents[1]
STUDY = Path(__file__).resolve().parent / "balance_study.yaml"
RESULT = Path(__file__).resolve().parent / "results" / "balance_study.json"


@dataclass(frozen=True, kw_only=True)
class Scheme:
    """One balancing scheme.

    Attributes:
        label: Its row in the table.
        overrides: Its recipe overrides.
    """

    label: str
    overrides: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class Study:
    """The study, as `balance_study.yaml` holds it.

    Attributes:
        recipe: The recipe every scheme trains.
        steps: Training steps per scheme.
        nproc: Processes per run.
        common: Overrides every run carries.
        schemes: The schemes, in table order.
    """

    recipe: str
    steps: int
    nproc: int
    common: tuple[str, ...]
    schemes: dict[str, Scheme]


def load_study(path: Path = STUDY) -> Study:
    """Reads the study's YAML."""
    raw = yaml.safe_load(path.read_text())
    schemes = {
        k: Scheme(label=v["label"], overrides=tuple(v["overrides"])) for k, v in raw["schemes"].items()
    }
    return Study(**{**raw, "common": tuple(raw["common"]), "schemes": schemes})


def scheme_overrides(study: Study, scheme: Scheme, steps: int) -> list[str]:
    """A scheme's overrides on top of the common ones, with its warm-ups scaled to the budget."""
    scaled = [f"balance.qr_warmup={max(2, steps // 5)}"]
    if "balance.weighter=coba" in scheme.overrides:  # its warm-up and window, scaled from MFTCoder's 100/200
        scaled += [
            f"balance.options.warmup={max(2, steps // 5)}",
            f"balance.options.history={max(4, 2 * steps // 5)}",
        ]
    return [*study.common, *scaled, *scheme.overrides]


def run_scheme(
    key: str, overrides: list[str], study: Study, steps: int, nproc: int, out: Path
) -> dict[str, Any]:
    """Trains one scheme with `overrides`; returns its wall time and final held-out evaluation."""
    run_dir = out / key
    cmd = [
        "deepspeed", "--num_gpus", str(nproc), "--master_port", str(free_port()),
        "launch/train.py", "--config", study.recipe,
        f"train.output_dir={run_dir}", f"train.steps={steps}", "train.save_every=0", *overrides,
    ]  # fmt: skip
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "WANDB_MODE": "disabled",
    }
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{key} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    result = json.loads((ROOT / run_dir / "eval.json").read_text())
    return {"wall_s": time.perf_counter() - start, "tasks": result["tasks"]}


def render_markdown(result: dict[str, Any]) -> str:
    """The docs' caption and table: per scheme, the held-out loss of each task, the worst and the mean.

    Pure: every number comes from `result` (`steps`, `nproc` and per scheme its held-out `tasks`); the
    best (lowest) value of each column is bold.
    """
    labels = {key: scheme.label for key, scheme in load_study().schemes.items()}
    schemes = result["schemes"]
    tasks = list(next(iter(schemes.values()))["tasks"])
    cells = {key: [f"{x:.3f}" for x in _losses(scheme, tasks)] for key, scheme in schemes.items()}
    best = [min(column, key=float) for column in zip(*cells.values(), strict=True)]  # as shown
    rows = [
        [labels.get(key, key)] + [bold_if(cell, cell == b) for cell, b in zip(row, best, strict=True)]
        for key, row in cells.items()
    ]
    minutes = sum(scheme["wall_s"] for scheme in schemes.values()) / 60
    caption = paragraph(
        f"Mean held-out token loss per task after {result['steps']} steps per scheme on {result['nproc']} "
        f"processes (the {len(schemes)} schemes took {minutes:.0f} minutes in all); the best value of each "
        "column is in bold:"
    )
    return caption + "\n\n" + table(["scheme", *tasks, "worst", "mean"], rows, "l" * (len(tasks) + 3))


def _losses(scheme: dict[str, Any], tasks: list[str]) -> list[float]:
    """One scheme's per-task losses, then the worst and the mean."""
    losses = [scheme["tasks"][t]["loss"] for t in tasks]
    return [*losses, max(losses), sum(losses) / len(losses)]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    study = load_study()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=study.steps)
    parser.add_argument("--nproc", type=int, default=study.nproc)
    parser.add_argument("--out", type=Path, default=Path("runs/balance_study"), help="the runs' folder")
    parser.add_argument("--only", nargs="+", choices=list(study.schemes), help="run only these schemes")
    parser.add_argument(
        "--update", action="store_true", help="keep the other schemes' results of the JSON (same steps)"
    )
    parser.add_argument("--json", type=Path, default=None, help=f"result path (default {RESULT})")
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: tiny random Llama, 2 steps, 1 process; prints only"
    )
    parser.add_argument("--data", type=Path, default=None, help="tokenized tasks (default: the demo's)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.nproc = 2, 1
    extra = [*(TINY_OVERRIDES if args.quick else ()), *([f"data.tokenized={args.data}"] if args.data else [])]
    json_path = args.json if args.json is not None else None if args.quick else RESULT
    if args.data is None:
        subprocess.run(["bash", "launch/prepare_demo_data.sh"], cwd=ROOT, check=True)
    results = {}
    if args.update:
        if json_path is None or not json_path.exists():
            parser.error("--update needs an existing result JSON")
        previous = json.loads(json_path.read_text())
        if (previous["steps"], previous["nproc"]) != (args.steps, args.nproc):
            had = f"{previous['steps']} steps on {previous['nproc']} processes"
            parser.error(f"--update: {json_path} has {had}; rerun with those")
        results = previous["schemes"]
    for key in args.only or list(study.schemes):
        scheme = study.schemes[key]
        overrides = scheme_overrides(study, scheme, args.steps)
        run = run_scheme(key, [*overrides, *extra], study, args.steps, args.nproc, args.out)
        results[key] = {"overrides": list(scheme.overrides), **run}
        losses = ", ".join(f"{t} {v['loss']:.3f}" for t, v in results[key]["tasks"].items())
        print(f"{scheme.label}: {losses} ({results[key]['wall_s']:.0f} s)", flush=True)
    results = {key: results[key] for key in study.schemes if key in results}  # the table's order
    summary = {"steps": args.steps, "nproc": args.nproc, "schemes": results}
    write_result(summary, json_path)
    print(render_markdown(summary))
    return summary


if __name__ == "__main__":
    main()
