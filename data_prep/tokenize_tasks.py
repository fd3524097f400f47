r"""Tokenizes tasks into per-task train/eval(/valid) shards and a manifest, for training.

    python data_prep/tokenize_tasks.py --task codegen=data/demo/jsonl/codegen.jsonl \
        --task translate=data/demo/jsonl/translate.jsonl --tokenizer smollm2-135m-instruct \
        --max-len 512 --overflow truncate --eval-fraction 0.1 --max-eval 24 --out data/demo/tokens \
        --metric codegen=pass@1 --metric translate=chrf --valid-fraction 0.05 --max-valid 64 --num-proc 2

Task ids follow the order of the --task flags, from 0. See `mtmoe.data.shards` for the layout.

A task is a JSONL, parquet, arrow, CSV or JSON file or folder, a `save_to_disk` folder, or `hf:NAME` (a
hub dataset, online only). Per task: `--source-config`, `--source-split`, `--rows NAME=START:END`,
`--columns NAME=KEY=COLUMN,...` (for schemas that are not MFTCoder's) and `--system NAME=TEMPLATE`.
Tokenized rows are cached by fingerprint under `--cache-dir` (default: the `datasets` cache), so a
second run with the same inputs and settings reads them back.

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

import datasets

from mtmoe.data.build import tokenize_tasks
from mtmoe.data.references import MetricSpec
from mtmoe.data.sources import TaskSource
from mtmoe.data.truncate import OVERFLOW_POLICIES
from mtmoe.eval.metrics import METRICS, check_reference
from mtmoe.model.base import load_tokenizer, resolve_base


def _pair(spec: str, what: str) -> tuple[str, str]:
    name, sep, value = spec.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"expected NAME={what}, got {spec!r}")
    return name, value


def parse_task(spec: str) -> tuple[str, str]:
    return _pair(spec, "PATH")


def parse_rows(spec: str) -> tuple[str, tuple[int, int | None]]:
    name, rows = _pair(spec, "START:END")
    start, sep, end = rows.partition(":")
    if not sep or not start.isdigit() or not (end.isdigit() or end == "") or (end and int(end) <= int(start)):
        raise argparse.ArgumentTypeError(
            f"--rows {spec}: expected NAME=START:END, 0 <= START < END (END optional)"
        )
    return name, (int(start), int(end) if end else None)


def parse_columns(spec: str) -> tuple[str, dict[str, str]]:
    name, pairs = _pair(spec, "KEY=COLUMN,...")
    columns = dict(_pair(pair.strip(), "COLUMN") for pair in pairs.split(","))
    return name, columns


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
    for flag, named in (("--labels", labels), ("--gen-tokens", caps)):
        if stray := sorted(set(named) - set(metrics)):
            parser.error(f"{flag}: task(s) {stray} declare no --metric")
    return {
        name: MetricSpec(name=metric, max_new_tokens=caps.get(name, 0), labels=labels.get(name, ()))
        for name, metric in metrics.items()
    }


PER_TASK = ("metric", "labels", "gen_tokens", "source_config", "source_split", "rows", "columns", "system")


def check_task_names(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Every per-task flag names a --task, once."""
    tasks = {name for name, _ in args.task}
    for dest in PER_TASK:
        flag = "--" + dest.replace("_", "-")
        named = [name for name, _ in getattr(args, dest)]
        if unknown := sorted(set(named) - tasks):
            parser.error(f"{flag}: unknown task(s) {unknown}")
        if twice := sorted({n for n in named if named.count(n) > 1}):
            parser.error(f"{flag}: task(s) {twice} given twice")


def task_sources(args: argparse.Namespace) -> dict[str, TaskSource]:
    """Each task's source, with its per-task options."""
    options = {dest: dict(getattr(args, dest)) for dest in PER_TASK[3:]}
    return {
        name: TaskSource(
            path=path,
            config=options["source_config"].get(name),
            split=options["source_split"].get(name),
            rows=options["rows"].get(name),
            columns=options["columns"].get(name, {}),
            system=options["system"].get(name),
        )
        for name, path in args.task
    }


def add_source_flags(parser: argparse.ArgumentParser) -> None:
    """The per-task source options and the tokenizing settings of the datasets path."""
    per_task = dict(action="append", default=[])
    parser.add_argument("--source-config", type=lambda s: _pair(s, "CONFIG"), metavar="NAME=CONFIG",
                        help="the hub dataset's config", **per_task)  # fmt: skip
    parser.add_argument("--source-split", type=lambda s: _pair(s, "SPLIT"), metavar="NAME=SPLIT",
                        help="the dataset's split to read (default train)", **per_task)  # fmt: skip
    parser.add_argument(
        "--rows", type=parse_rows, metavar="NAME=START:END", help="only these rows", **per_task
    )
    parser.add_argument("--columns", type=parse_columns, metavar="NAME=KEY=COLUMN,...",
                        help="record keys from other columns, e.g. qa=prompt=question,answer=label",
                        **per_task)  # fmt: skip
    parser.add_argument("--system", type=lambda s: _pair(s, "TEMPLATE"), metavar="NAME=TEMPLATE",
                        help="a system prompt, formatted with the row's fields", **per_task)  # fmt: skip
    parser.add_argument("--valid-fraction", type=float, default=0.0,
                        help="share of records held out for validation (CoBa, QR)")  # fmt: skip
    parser.add_argument("--max-valid", type=int, default=None, help="cap on valid records per task")
    parser.add_argument("--num-proc", type=int, default=1, help="processes that tokenize")
    parser.add_argument("--cache-dir", type=Path, default=Path(datasets.config.HF_DATASETS_CACHE),
                        help="where tokenized rows are cached (default: the datasets cache)")  # fmt: skip
    parser.add_argument("--no-cache", action="store_true", help="keep no tokenized rows for the next run")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--task",
        type=parse_task,
        action="append",
        required=True,
        metavar="NAME=PATH",
        help="a task: a JSONL, parquet, arrow, CSV or JSON file or folder, a save_to_disk folder, or hf:NAME;"
        " repeat for more tasks",
    )
    parser.add_argument("--tokenizer", required=True, help="tokenizer folder, or smollm2-135m-instruct")
    parser.add_argument("--max-len", type=int, default=512, help="longest sample, in tokens")
    parser.add_argument(
        "--overflow",
        choices=OVERFLOW_POLICIES,
        default="truncate",
        help="longer samples: truncate (shorten the prompt, oldest turns first, keep the answer),"
        " truncate-middle (cut the middle of the last user turn first), truncate-right (cut from the"
        " right, as manifest version 1 did) or drop",
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
    add_source_flags(parser)
    args = parser.parse_args(argv)
    if len(dict(args.task)) != len(args.task):
        parser.error("a task name is given twice")
    check_task_names(args, parser)
    metrics = metric_specs(args, parser)

    start = time.perf_counter()
    folder = Path(args.tokenizer) if Path(args.tokenizer).is_dir() else resolve_base(args.tokenizer)
    tokenizer = load_tokenizer(folder)
    manifest = tokenize_tasks(
        task_sources(args),
        tokenizer,
        tokenizer_path=args.tokenizer,
        max_len=args.max_len,
        overflow=args.overflow,
        eval_fraction=args.eval_fraction,
        max_eval=args.max_eval,
        out=args.out,
        metrics=metrics,
        check=check_reference,
        valid_fraction=args.valid_fraction,
        max_valid=args.max_valid,
        num_proc=args.num_proc,
        cache_dir=None if args.no_cache else args.cache_dir,
    )
    print(f"wrote {len(manifest.tasks)} tasks to {args.out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
