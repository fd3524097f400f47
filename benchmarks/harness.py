"""Timing: interleaved, rotated rounds on CPU time, medians and ratios to a baseline of the same run.

A benchmark builds its variants, checks that they compute the same thing, and hands one zero-argument
step per variant to `time_rounds`: every variant is warmed up, then timed in rounds whose order is
rotated each round (so slow drift of the machine spreads over all variants), by default on CPU time
(`time.process_time`, so another job on another core does not count). `summarize` turns the per-round
times into medians and ratios; `machine_info` and `timing_settings` give the matching JSON blocks.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from typing import Any

import torch

CLOCK = "time.process_time"
ORDER = "interleaved, rotated each round"


def machine_info(**extra: Any) -> dict[str, Any]:
    """The torch version and threads, `OMP_NUM_THREADS`, platform, processor, Python, CPUs; and `extra`."""
    return {
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        **extra,
    }


def versions() -> dict[str, str]:
    """Installed versions of the libraries the variants use (from package metadata)."""
    return {name: metadata.version(name) for name in ("torch", "transformers", "peft", "deepspeed")}


def timing_settings(rounds: int, iters: int, warmup: int, **extra: Any) -> dict[str, Any]:
    """The JSON record of how `time_rounds` timed (clock, counts, ordering), with `extra` entries."""
    return {
        "clock": CLOCK,
        "rounds": rounds,
        "iters_per_round": iters,
        "warmup_iters": warmup,
        "order": ORDER,
        **extra,
    }


def rotated(names: Sequence[str], round_index: int) -> list[str]:
    """The variant order of one round: `names` rotated left by `round_index`."""
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
    clock: Callable[[], float] = time.process_time,
    before: Callable[[], object] | None = None,
    after: Callable[[], object] | None = None,
    reduce: Callable[[float], float] | None = None,
) -> dict[str, list[float]]:
    """Warms up, then times every step in interleaved, rotated rounds.

    Args:
        steps: One zero-argument step per variant; the mapping's order is the base order of the rounds.
        rounds: Number of rounds; round `r` runs the variants in the base order rotated left by `r`.
        iters: Timed calls of a step per variant per round.
        warmup: Untimed calls of each step, in the base order, before the first round.
        scale: Factor applied to the seconds per call (1e3 for milliseconds).
        warm_step_per_round: Run one untimed call right before each timed block, so each block starts warm.
        clock: The clock (CPU time by default; wall time where the work waits on a device or a peer).
        before: Called before each timed block starts (a barrier, a device synchronization).
        after: Called after the block's calls, before the clock is read (a device synchronization).
        reduce: Applied to each round's time per call (the slowest rank's, say).

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
            if before is not None:
                before()
            t0 = clock()
            for _ in range(iters):
                step()
            if after is not None:
                after()
            seconds = (clock() - t0) / iters * scale
            per_round[name].append(reduce(seconds) if reduce is not None else seconds)
    return per_round


def ratios(per_round: Mapping[str, Sequence[float]], baseline: str) -> dict[str, dict[str, float]]:
    """Ratios to `baseline`: of the medians, and the median of the per-round ratios (drift cancels)."""
    median = {name: statistics.median(times) for name, times in per_round.items()}
    return {
        f"ratio_to_{baseline}": {name: median[name] / median[baseline] for name in per_round},
        f"median_per_round_ratio_to_{baseline}": {
            name: statistics.median(a / b for a, b in zip(per_round[name], per_round[baseline], strict=True))
            for name in per_round
        },
    }


def summarize(per_round: Mapping[str, Sequence[float]], baseline: str, unit: str) -> dict[str, Any]:
    """`median_<unit>` per variant, then `ratios` to `baseline`, in that order."""
    median = {name: statistics.median(times) for name, times in per_round.items()}
    return {f"median_{unit}": median, **ratios(per_round, baseline)}
