"""The multitask-balancing study: the same budget on the demo tasks under five loss/sampling schemes.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/balance_study.py [--steps 50] [--nproc 2]
    ... --only coba famo --update      # rerun some schemes, keep the others' results in the JSON
    ... --quick --data DIR --json X    # the smoke test: a tiny random Llama, 2 steps, 1 process

The demo mix is imbalanced by itself: docstring has 2,901 training samples, codegen 139 (about 20×).
Each scheme trains SmolLM2-135M with the demo recipe (2 processes, DeepSpeed ZeRO-2) for the same
number of steps and reports the held-out token loss per task and the worst task's loss. Quality
Retaining, added to the data-balanced loss, is the sixth scheme. Results go to
benchmarks/results/balance_study.json and are printed as the README's Markdown table (`render_markdown`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench_cli import TINY_OVERRIDES, write_result
from md_tables import bold_if, paragraph, table

from mtmoe.parallel.dist import free_port

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "balance_study.json"
PROPORTIONAL = ["data.mixing=proportional"]
# Every scheme's run, as measured: the demo recipe before it packed micro-batches (Quality Retaining
# refuses packing) and warmed up for 10 steps; the study compares held-out losses.
COMMON = ["data.packing=false", "train.warmup_steps=5", "train.eval_metrics=false"]
SCHEMES = {
    "plain": ("proportional + token mean (plain)", [*PROPORTIONAL, "balance.weighter=token_mean"]),
    "balanced": ("proportional + data-balanced loss", [*PROPORTIONAL, "balance.weighter=uniform"]),
    "temperature": (
        "temperature (T=3) + data-balanced",
        ["data.mixing=temperature", "data.temperature=3", "balance.weighter=uniform"],
    ),
    "coba": ("proportional + CoBa", [*PROPORTIONAL, "balance.weighter=coba"]),
    "famo": ("proportional + FAMO", [*PROPORTIONAL, "balance.weighter=famo"]),
    "quality_retain": (
        "proportional + data-balanced + Quality Retaining",
        [*PROPORTIONAL, "balance.weighter=uniform", "balance.quality_retain=true"],
    ),
}


def run_scheme(
    key: str, overrides: list[str], steps: int, nproc: int, out: Path, extra: tuple[str, ...] = ()
) -> dict:
    """Trains one scheme (with `extra` recipe overrides on top) and returns its final held-out evaluation."""
    run_dir = out / key
    cmd = [
        "deepspeed", "--num_gpus", str(nproc), "--master_port", str(free_port()),
        "launch/train.py", "--config", "launch/recipes/demo.yaml",
        f"train.output_dir={run_dir}", f"train.steps={steps}", "train.save_every=0",
        *COMMON,
        f"balance.qr_warmup={max(2, steps // 5)}",
        *overrides, *extra,
    ]  # fmt: skip
    if "balance.weighter=coba" in overrides:  # its warm-up and window, scaled from MFTCoder's 100/200
        cmd += [
            f"balance.options.warmup={max(2, steps // 5)}",
            f"balance.options.history={max(4, 2 * steps // 5)}",
        ]
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
    return {"overrides": overrides, "wall_s": time.perf_counter() - start, "tasks": result["tasks"]}


def render_markdown(result: dict) -> str:
    """The README's balancing-study caption and table, from the study's JSON.

    Pure: no I/O. Every number comes from `result`; the best (lowest) value of each column is bold.

    Args:
        result: The summary `main` writes (`steps`, `nproc` and per scheme its held-out `tasks`).

    Returns:
        A caption (steps, processes, time taken) and the table: per scheme, the held-out token loss of each
        task, of the worst task and their mean.
    """
    schemes = result["schemes"]
    tasks = list(next(iter(schemes.values()))["tasks"])
    cells = {key: [f"{x:.3f}" for x in _losses(scheme, tasks)] for key, scheme in schemes.items()}
    best = [min(column, key=float) for column in zip(*cells.values(), strict=True)]  # as shown
    rows = [
        [SCHEMES[key][0] if key in SCHEMES else key]
        + [bold_if(cell, cell == b) for cell, b in zip(row, best, strict=True)]
        for key, row in cells.items()
    ]
    minutes = sum(scheme["wall_s"] for scheme in schemes.values()) / 60
    caption = paragraph(
        f"Mean held-out token loss per task after {result['steps']} steps per scheme on {result['nproc']} "
        f"processes (the {len(schemes)} schemes took {minutes:.0f} minutes in all); the best value of each "
        "column is in bold:"
    )
    return caption + "\n\n" + table(["scheme", *tasks, "worst", "mean"], rows, "l" * (len(tasks) + 3))


def _losses(scheme: dict, tasks: list[str]) -> list[float]:
    """One scheme's per-task losses, then the worst and the mean."""
    losses = [scheme["tasks"][t]["loss"] for t in tasks]
    return [*losses, max(losses), sum(losses) / len(losses)]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/balance_study"), help="the runs' folder")
    parser.add_argument("--only", nargs="+", choices=list(SCHEMES), help="run only these schemes")
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
    extra = (*(TINY_OVERRIDES if args.quick else ()), *([f"data.tokenized={args.data}"] if args.data else []))
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
    for key in args.only or list(SCHEMES):
        name, overrides = SCHEMES[key]
        results[key] = run_scheme(key, overrides, args.steps, args.nproc, args.out, extra)
        losses = ", ".join(f"{t} {v['loss']:.3f}" for t, v in results[key]["tasks"].items())
        print(f"{name}: {losses} ({results[key]['wall_s']:.0f} s)", flush=True)
    results = {key: results[key] for key in SCHEMES if key in results}  # the table's order
    summary = {"steps": args.steps, "nproc": args.nproc, "schemes": results}
    write_result(summary, json_path)
    print(render_markdown(summary))
    return summary


if __name__ == "__main__":
    main()
