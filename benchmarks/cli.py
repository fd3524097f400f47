"""The command line every benchmark shares: `--quick`, `--out`, `--render`, `--tiny`, the JSON write.

Standard library only, so a parent process that must not import torch before its children run (the
memory benchmark) can use it at any time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
# `--tiny`: the demo recipe on a tiny random Llama (2 layers, hidden 64) instead of SmolLM2-135M. For smoke
# tests of a benchmark's code path (tests/test_bench_smoke.py); its numbers mean nothing.
TINY_OVERRIDES = ("model.base=tiny-llama",)
TINY_HELP = "smoke test: the demo recipe on a tiny random Llama; needs --quick or --out"


@dataclass(frozen=True)
class CliDefaults:
    """One benchmark's command-line defaults.

    Attributes:
        out: Where a full run writes its JSON when `--out` is not given.
        rounds: Default of `--rounds` (None: the benchmark takes no `--rounds/--iters/--warmup`).
        iters: Default of `--iters` (None: one timed call per variant per round, no `--iters`).
        warmup: Default of `--warmup`.
        quick: (rounds, iters, warmup) of a `--quick` run.
        quick_help: What `--quick` does.
        tiny: The benchmark takes `--tiny`.
    """

    out: Path
    rounds: int | None = None
    iters: int | None = 1
    warmup: int = 1
    quick: tuple[int, int, int] = (1, 1, 1)
    quick_help: str = "short run; prints only"
    tiny: bool = False


@dataclass(frozen=True)
class Mode:
    """One way to run a benchmark: its defaults, how it runs and how its JSON renders.

    Attributes:
        cli: The command-line defaults.
        run: Builds, checks and times from the parsed arguments; returns the result record.
        render: The docs' Markdown of a result record (pure: no I/O, nothing built); a run prints it.
        arguments: Adds the mode's own arguments to its parser.
        help: One line for the mode's entry in `--help`.
    """

    cli: CliDefaults
    run: Callable[[argparse.Namespace], dict[str, Any]]
    render: Callable[[Mapping[str, Any]], str]
    arguments: Callable[[argparse.ArgumentParser], None] | None = None
    help: str = ""


def main(description: str, modes: Mode | Mapping[str, Mode], argv: list[str] | None) -> dict[str, Any]:
    """A benchmark's `main`: parse, then print a JSON's Markdown (`--render`) or run, print and write.

    Args:
        description: The parser's description (the benchmark's one-line summary).
        modes: The benchmark's one mode, or its modes by name (the first argument picks one).
        argv: Arguments to parse; None for `sys.argv[1:]`.

    Returns:
        The result record (with `quick` added), or the rendered JSON's.
    """
    top = argparse.ArgumentParser(description=description)
    if isinstance(modes, Mode):
        add_arguments(top, modes)
    else:
        sub = top.add_subparsers(dest="mode", required=True)
        for name, m in modes.items():
            add_arguments(sub.add_parser(name, help=m.help, description=m.help), m)
    args = top.parse_args(argv)
    mode = modes if isinstance(modes, Mode) else modes[args.mode]
    args.tiny = getattr(args, "tiny", False)
    if args.quick and mode.cli.rounds is not None:
        args.rounds, args.iters, args.warmup = mode.cli.quick
    check_tiny(top, args.tiny, args.quick, args.out is not None)
    if args.render is not None:
        return print_rendered(args.render, mode.render)
    warn_unless_one_thread()
    result = mode.run(args)
    return finish(result, args, mode.cli, mode.render(result))


def add_arguments(p: argparse.ArgumentParser, mode: Mode) -> None:
    """The shared arguments: `--quick`, `--out`, `--render`, as the mode says timing and `--tiny`; its own."""
    cli = mode.cli
    p.add_argument("--quick", action="store_true", help=cli.quick_help)
    p.add_argument("--out", type=Path, default=None, help=f"JSON path (default {cli.out})")
    p.add_argument("--render", type=Path, default=None, help="only print the Markdown of this JSON")
    if cli.rounds is not None:
        p.add_argument("--rounds", type=int, default=cli.rounds, help="interleaved rounds")
        if cli.iters is not None:
            p.add_argument("--iters", type=int, default=cli.iters, help="timed calls per variant per round")
        p.add_argument("--warmup", type=int, default=cli.warmup, help="untimed calls per variant first")
    if cli.tiny:
        p.add_argument("--tiny", action="store_true", help=TINY_HELP)
    if mode.arguments is not None:
        mode.arguments(p)


def check_tiny(p: argparse.ArgumentParser, tiny: bool, quick: bool, has_out: bool) -> None:
    """A `--tiny` run never writes the default result JSON: it needs `--quick` or `--out`."""
    if tiny and not (quick or has_out):
        p.error("--tiny: give --quick or --out (a tiny run never replaces the real result)")


def warn_unless_one_thread() -> None:
    """Says on stderr that timings want `OMP_NUM_THREADS=1`, unless it is set so."""
    if os.environ.get("OMP_NUM_THREADS") != "1":
        print("note: run with OMP_NUM_THREADS=1 for comparable numbers", file=sys.stderr)


def print_rendered(path: Path, render: Callable[[dict[str, Any]], str]) -> dict[str, Any]:
    """`--render PATH`: prints `render` of the JSON at `path` and returns the record."""
    result = json.loads(path.read_text())
    print(render(result))
    return result


def result_path(out: Path | None, quick: bool, default: Path) -> Path | None:
    """Where the JSON goes: `--out`, else `default` for a full run; a `--quick` run only prints (None)."""
    if out is not None:
        return out
    return None if quick else default


def write_result(result: Mapping[str, Any], out: Path | None) -> None:
    """Writes `result` as indented JSON to `out` (creating its folder) and says so; None writes nothing."""
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")


def finish(result: dict[str, Any], args: argparse.Namespace, cli: CliDefaults, *lines: str) -> dict[str, Any]:
    """Adds `quick` to the record, prints `lines` and writes the JSON where `--out`/`--quick` say."""
    result["quick"] = args.quick
    for line in lines:
        print(line)
    write_result(result, result_path(args.out, args.quick, cli.out))
    return result
