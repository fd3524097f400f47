"""Command-line pieces every benchmark script shares: the thread warning, `--render`, the JSON write.

Standard library only, so a parent process that must not import torch before its children run (the
memory benchmark) can use them at any time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

# `--tiny`: the demo recipe on a tiny random Llama (2 layers, hidden 64) instead of SmolLM2-135M. For smoke
# tests of a benchmark's code path (tests/test_bench_smoke.py); its numbers mean nothing.
TINY_OVERRIDES = ("model.base=tiny-llama",)
TINY_HELP = "smoke test: the demo recipe on a tiny random Llama; needs --quick or --out"


def check_tiny(parser: argparse.ArgumentParser, tiny: bool, quick: bool, has_out: bool) -> None:
    """A `--tiny` run never writes the default result JSON: it needs `--quick` or `--out`."""
    if tiny and not (quick or has_out):
        parser.error("--tiny: give --quick or --out (a tiny run never replaces the real result)")


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
    """Writes `result` as indented JSON to `out` (creating its folder) and says so; None writes nothing.

    Args:
        result: The result record.
        out: The JSON path, or None.
    """
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
