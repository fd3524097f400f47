"""The timing harness shared by the benchmark scripts in this folder.

Each script builds its variants, checks that they compute the same thing, and hands one zero-argument
step per variant to `time_rounds`: every variant is warmed up, then timed in interleaved rounds whose
order is rotated each round (so slow drift of the machine spreads over all variants), on CPU time
(`time.process_time`, so another job on another core does not count). `summarize` turns the per-round
times into medians and ratios to a baseline measured in the same run; `machine_info` and
`timing_settings` give the matching JSON blocks; `Table` and `format_table` lay out the per-variant
table; `cli_main` (with `CliDefaults`, `parse_cli` and `write_result`) is the shared command line
(`--quick/--rounds/--iters/--warmup/--out`), printout and JSON output.

The folder is not a package: a script run as `python benchmarks/<name>.py` has its own folder first on
`sys.path`, so it imports this module as `harness`.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from bench_cli import TINY_HELP, check_tiny, result_path, warn_unless_one_thread, write_result

CLOCK = "time.process_time"
ORDER = "interleaved, rotated each round"


def machine_info() -> dict[str, Any]:
    """The machine and thread settings a timing was taken under.

    Returns:
        torch version and thread count, the `OMP_NUM_THREADS` environment variable, platform, processor,
        Python version and CPU count.
    """
    return {
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }


def random_batch(
    batch: int, seq: int, vocab: int, loss_fraction: float, seed: int
) -> dict[str, torch.Tensor]:
    """The benchmarks' batch: seeded random tokens, no padding, one task, and a loss mask.

    The mask holds about `loss_fraction` of positions, never position 0; `labels` are HF's (-100 off it).
    """
    gen = torch.Generator().manual_seed(seed)
    input_ids_BS = torch.randint(0, vocab, (batch, seq), generator=gen)
    loss_mask_BS = (torch.rand(batch, seq, generator=gen) < loss_fraction).long()
    loss_mask_BS[:, 0] = 0
    return {
        "input_ids": input_ids_BS,
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
        "loss_mask": loss_mask_BS,
        "labels": torch.where(loss_mask_BS.bool(), input_ids_BS, torch.full_like(input_ids_BS, -100)),
        "task_ids": torch.zeros(batch, dtype=torch.long),
    }


def timing_settings(rounds: int, iters: int, warmup: int) -> dict[str, Any]:
    """The JSON record of how `time_rounds` timed.

    Args:
        rounds: Number of interleaved rounds.
        iters: Timed iterations per variant per round.
        warmup: Untimed warm-up iterations per variant before the first round.

    Returns:
        The clock, the three counts and the ordering scheme.
    """
    return {
        "clock": CLOCK,
        "rounds": rounds,
        "iters_per_round": iters,
        "warmup_iters": warmup,
        "order": ORDER,
    }


def rotated(names: Sequence[str], round_index: int) -> list[str]:
    """The variant order of one round: `names` rotated left by `round_index`.

    Args:
        names: The variants in their base order.
        round_index: Which round (0-based).

    Returns:
        `names` starting at position `round_index % len(names)`, wrapping around.
    """
    k = round_index % len(names)
    return [*names[k:], *names[:k]]


def time_rounds(
    steps: Mapping[str, Callable[[], object]],
    rounds: int,
    iters: int,
    warmup: int,
    *,
    scale: float = 1.0,
    warm_step_per_round: bool = False,
) -> dict[str, list[float]]:
    """Warms up, then times every step in interleaved, rotated rounds on CPU time.

    Args:
        steps: One zero-argument step per variant; the mapping's order is the base order of the rounds.
        rounds: Number of rounds; round `r` runs the variants in the base order rotated left by `r`.
        iters: Timed calls of a step per variant per round.
        warmup: Untimed calls of each step, in the base order, before the first round.
        scale: Factor applied to the seconds per call (1e3 for milliseconds).
        warm_step_per_round: If true, run one untimed call right before each timed block, so each block
            starts warm.

    Returns:
        Per variant, in the order of `steps`, the time per call of every round (seconds x `scale`).
    """
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            steps[name]()

    per_round: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in rotated(names, r):
            step = steps[name]
            if warm_step_per_round:
                step()
            t0 = time.process_time()
            for _ in range(iters):
                step()
            per_round[name].append((time.process_time() - t0) / iters * scale)
    return per_round


def summarize(per_round: Mapping[str, Sequence[float]], baseline: str, unit: str) -> dict[str, Any]:
    """Medians of the per-round times, and their ratios to `baseline` measured in the same run.

    Args:
        per_round: Per variant, the time of every round (as from `time_rounds`).
        baseline: The variant the ratios are taken against.
        unit: The time unit's suffix in the median key ("ms", "s").

    Returns:
        Three entries, in this order: `median_<unit>` (median time per variant), `ratio_to_<baseline>`
        (ratio of the medians) and `median_per_round_ratio_to_<baseline>` (median of the per-round
        ratios, which cancels drift shared by the variants of one round).
    """
    median = {name: statistics.median(times) for name, times in per_round.items()}
    return {
        f"median_{unit}": median,
        f"ratio_to_{baseline}": {name: median[name] / median[baseline] for name in per_round},
        f"median_per_round_ratio_to_{baseline}": {
            name: statistics.median(a / b for a, b in zip(per_round[name], per_round[baseline], strict=True))
            for name in per_round
        },
    }


@dataclass(frozen=True)
class Table:
    """The per-variant table a script prints.

    Attributes:
        names: The variants, in row order.
        header: The header line.
        row: A `str.format` template of one row; it gets `name` (the variant) and, by its key, every entry
            of the result record that maps variants to values.
    """

    names: Sequence[str]
    header: str
    row: str


def format_table(result: Mapping[str, Any], table: Table) -> str:
    """Lays out `table` for a result record.

    Args:
        result: The result record.
        table: The table's rows, header and row template.

    Returns:
        The header and one line per variant, joined by newlines.
    """
    lines = [table.header]
    for name in table.names:
        fields = {k: v[name] for k, v in result.items() if isinstance(v, Mapping) and name in v}
        lines.append(table.row.format(name=name, **fields))
    return "\n".join(lines)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


@dataclass(frozen=True)
class CliDefaults:
    """One script's command-line defaults.

    Attributes:
        rounds: Default of `--rounds`.
        iters: Default of `--iters`.
        warmup: Default of `--warmup`.
        quick: (rounds, iters, warmup) of a `--quick` run.
        iter_name: What one timed iteration is, plural ("iterations", "steps"), for the `--iters` help.
        out: Where a full run writes its JSON when `--out` is not given.
        tiny: The script takes `--tiny` (the demo recipe on a tiny random Llama, for smoke tests), and
            its `run` a `tiny` keyword.
    """

    rounds: int
    iters: int
    warmup: int
    quick: tuple[int, int, int]
    iter_name: str
    out: Path
    tiny: bool = False


def parse_cli(description: str, argv: list[str] | None, cli: CliDefaults) -> argparse.Namespace:
    """Parses the shared command line; `--quick` replaces rounds, iters and warm-up.

    Also prints a note to stderr when `OMP_NUM_THREADS` is not 1.

    Args:
        description: The parser's description (the script's one-line summary).
        argv: Arguments to parse; None for `sys.argv[1:]`.
        cli: The script's defaults.

    Returns:
        The parsed arguments: `quick`, `rounds`, `iters`, `warmup` and `out` (None unless given).
    """
    q_rounds, q_iters, _ = cli.quick
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"short run ({_plural(q_rounds, 'round')} x {_plural(q_iters, 'iter')}); prints only",
    )
    parser.add_argument("--rounds", type=int, default=cli.rounds)
    parser.add_argument(
        "--iters", type=int, default=cli.iters, help=f"timed {cli.iter_name} per variant per round"
    )
    parser.add_argument("--warmup", type=int, default=cli.warmup)
    parser.add_argument("--out", type=Path, default=None, help=f"JSON path (default {cli.out})")
    if cli.tiny:
        parser.add_argument("--tiny", action="store_true", help=TINY_HELP)
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.iters, args.warmup = cli.quick
    args.tiny = getattr(args, "tiny", False)
    check_tiny(parser, args.tiny, args.quick, args.out is not None)
    warn_unless_one_thread()
    return args


def cli_main(
    description: str,
    argv: list[str] | None,
    cli: CliDefaults,
    run: Callable[[int, int, int], dict[str, Any]],
    table: Table,
    checks_line: Callable[[dict[str, Any]], str],
) -> dict[str, Any]:
    """A benchmark script's `main`: parse the command line, run, print the results, write the JSON.

    Prints the table, then the line that reports the script's checks. The JSON goes to `--out`, else (for
    a full run) to `cli.out`; a `--quick` run without `--out` only prints.

    Args:
        description: The parser's description (the script's one-line summary).
        argv: Arguments to parse; None for `sys.argv[1:]`.
        cli: The script's defaults.
        run: Builds, checks and times the variants from (rounds, iters, warmup); returns the result record.
        table: The table to print.
        checks_line: The line to print after the table, from the result record.

    Returns:
        The result record, with `quick` added.
    """
    args = parse_cli(description, argv, cli)
    result = run(args.rounds, args.iters, args.warmup, **({"tiny": args.tiny} if cli.tiny else {}))
    result["quick"] = args.quick
    print(format_table(result, table))
    print(checks_line(result))
    write_result(result, result_path(args.out, args.quick, cli.out))
    return result
