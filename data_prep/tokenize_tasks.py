r"""Tokenizes task JSONL into per-task train/eval shards and a manifest, for training.

    python data_prep/tokenize_tasks.py --task codegen=data/demo/jsonl/codegen.jsonl \
        --task translate=data/demo/jsonl/translate.jsonl --tokenizer smollm2-135m-instruct \
        --max-len 512 --overflow truncate --eval-fraction 0.1 --max-eval 24 --out data/demo/tokens

Task ids follow the order of the --task flags, from 0. See `mtmoe.data.shards` for the layout.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from mtmoe.data.shards import OVERFLOW_POLICIES, tokenize_tasks
from mtmoe.model.base import load_tokenizer, resolve_base


def parse_task(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {spec!r}")
    return name, Path(path)


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
    args = parser.parse_args(argv)
    tasks = dict(args.task)
    if len(tasks) != len(args.task):
        parser.error("a task name is given twice")

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
    )
    print(f"wrote {len(manifest.tasks)} tasks to {args.out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
