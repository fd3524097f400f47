r"""Tokenizes task JSONL into per-task train/eval shards and a manifest, for training.

    python data_prep/tokenize_tasks.py --task codegen=data/demo/jsonl/codegen.jsonl \
        --task translate=data/demo/jsonl/translate.jsonl --tokenizer smollm2-135m-instruct \
        --max-len 512 --overflow truncate --eval-fraction 0.1 --max-eval 24 --out data/demo/tokens \
        --metric codegen=pass@1 --metric translate=chrf

Task ids follow the order of the --task flags, from 0. See `mtmoe.data.shards` for the layout.

A task may declare the metric its generated answers are scored by (`--metric NAME=METRIC`: pass@1,
chrf, bleu, exact_match or accuracy); a task without one is scored by held-out loss only. `accuracy`
needs the label set (`--labels NAME=a,b,c`), pass@1 records need `test` and `entry_point` (and may give
`code_prefix`); a record the metric cannot score is refused with its file and line. `--gen-tokens
NAME=N` caps the generated tokens (default: the longest held-out answer plus 8).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from mtmoe.data.references import MetricSpec
from mtmoe.data.shards import OVERFLOW_POLICIES, tokenize_tasks
from mtmoe.eval.metrics import METRICS, check_reference
from mtmoe.model.base import load_tokenizer, resolve_base


def _pair(spec: str, what: str) -> tuple[str, str]:
    name, sep, value = spec.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"expected NAME={what}, got {spec!r}")
    return name, value


def parse_task(spec: str) -> tuple[str, Path]:
    name, path = _pair(spec, "PATH")
    return name, Path(path)


def parse_metric(spec: str) -> tuple[str, str]:
    name, metric = _pair(spec, "METRIC")
    if metric not in METRICS:
        raise argparse.ArgumentTypeError(
            f"--metric {spec}: unknown metric {metric!r}; known: {sorted(METRICS)}"
        )
    return name, metric


def parse_labels(spec: str) -> tuple[str, tuple[str, ...]]:
    name, labels = _pair(spec, "LABEL,LABEL,...")
    return name, tuple(label.strip() for label in labels.split(",") if label.strip())


def parse_gen_tokens(spec: str) -> tuple[str, int]:
    name, n = _pair(spec, "N")
    if not n.isdigit() or int(n) < 1:
        raise argparse.ArgumentTypeError(f"--gen-tokens {spec}: expected a positive integer")
    return name, int(n)


def metric_specs(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, MetricSpec]:
    """Each task's declared metric, from --metric, --labels and --gen-tokens."""
    metrics, labels, caps = dict(args.metric), dict(args.labels), dict(args.gen_tokens)
    for flag, named in (("--metric", metrics), ("--labels", labels), ("--gen-tokens", caps)):
        if unknown := sorted(set(named) - {name for name, _ in args.task}):
            parser.error(f"{flag}: unknown task(s) {unknown}")
    for flag, named in (("--labels", labels), ("--gen-tokens", caps)):
        if stray := sorted(set(named) - set(metrics)):
            parser.error(f"{flag}: task(s) {stray} declare no --metric")
    return {
        name: MetricSpec(name=metric, max_new_tokens=caps.get(name, 0), labels=labels.get(name, ()))
        for name, metric in metrics.items()
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--task",
        type=parse_task,
        action="append",
        required=True,
        metavar="NAME=PATH",
        help="a task: a .jsonl file or a folder of them; repeat for more tasks",
    )
    parser.add_argument("--tokenizer", required=True, help="tokenizer folder, or smollm2-135m-instruct")
    parser.add_argument("--max-len", type=int, default=512, help="longest sample, in tokens")
    parser.add_argument(
        "--overflow", choices=OVERFLOW_POLICIES, default="truncate", help="what to do with longer samples"
    )
    parser.add_argument("--eval-fraction", type=float, default=0.1, help="share of records held out")
    parser.add_argument("--max-eval", type=int, default=None, help="cap on eval records per task")
    parser.add_argument("--out", type=Path, required=True, help="output folder (replaces a previous one)")
    parser.add_argument(
        "--metric", type=parse_metric, action="append", default=[], metavar="NAME=METRIC",
        help=f"the task's generation metric, one of {sorted(METRICS)}",
    )  # fmt: skip
    parser.add_argument(
        "--labels", type=parse_labels, action="append", default=[], metavar="NAME=A,B,...",
        help="the label set of an accuracy task",
    )  # fmt: skip
    parser.add_argument(
        "--gen-tokens", type=parse_gen_tokens, action="append", default=[], metavar="NAME=N",
        help="cap on generated tokens (default: the longest held-out answer + 8)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    tasks = dict(args.task)
    if len(tasks) != len(args.task):
        parser.error("a task name is given twice")
    metrics = metric_specs(args, parser)

    start = time.perf_counter()
    folder = Path(args.tokenizer) if Path(args.tokenizer).is_dir() else resolve_base(args.tokenizer)
    tokenizer = load_tokenizer(folder)
    manifest = tokenize_tasks(
        tasks,
        tokenizer,
        tokenizer_path=args.tokenizer,
        max_len=args.max_len,
        overflow=args.overflow,
        eval_fraction=args.eval_fraction,
        max_eval=args.max_eval,
        out=args.out,
        metrics=metrics,
        check=check_reference,
    )
    print(f"wrote {len(manifest.tasks)} tasks to {args.out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
