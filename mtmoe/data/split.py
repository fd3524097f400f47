"""Train / eval / valid split by a fixed hash of each record, never by its position.

A record's side depends only on its content: the SHA-1 of its canonical JSON (keys sorted, no
spaces, its tests left out), read as a number h in [0, 1). A record lands in eval when h is below the
eval fraction, and in valid when h lies in the next band, [eval fraction, eval fraction + valid
fraction), so the eval split does not move when a valid split is added. Adding, removing or reordering
other records never moves a record, and exact duplicates always land together. An optional cap per split
keeps only its records with the lowest hashes and returns the rest to train, which is just as stable.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mtmoe.data.formats import Example, read_task

KEY_BITS = 64
SPLITS = ("train", "eval", "valid")  # codes 0, 1, 2 of `assign_splits`
EVAL_ONLY_KEYS = ("test", "entry_point", "code_prefix")  # see `mtmoe.data.references`


def record_key(record: Any) -> int:
    """The record's split key: the first 64 bits of the SHA-1 of its canonical JSON.

    The evaluation-only fields (`EVAL_ONLY_KEYS`: a record's tests) are left out, so adding tests to a
    task does not move its records between the splits.
    """
    if isinstance(record, dict):
        record = {k: v for k, v in record.items() if k not in EVAL_ONLY_KEYS}
    # `default=str`: a dataset row may hold values JSON has no type for (dates); JSON records never do
    canonical = json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return int.from_bytes(hashlib.sha1(canonical.encode("utf-8")).digest()[: KEY_BITS // 8], "big")


def check_split(
    eval_fraction: float,
    max_eval: int | None = None,
    valid_fraction: float = 0.0,
    max_valid: int | None = None,
) -> None:
    """Validates split settings.

    Raises:
        ValueError: If a fraction is outside [0, 1], they add up to more than 1, or a cap is negative.
    """
    for name, fraction in (("eval_fraction", eval_fraction), ("valid_fraction", valid_fraction)):
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {fraction}")
    if eval_fraction + valid_fraction > 1.0:
        raise ValueError(f"eval_fraction + valid_fraction must be <= 1, got {eval_fraction + valid_fraction}")
    for name, cap in (("max_eval", max_eval), ("max_valid", max_valid)):
        if cap is not None and cap < 0:
            raise ValueError(f"{name} must be >= 0 or None, got {cap}")


def _bound(fraction: float) -> int:
    """The smallest key not below `fraction` of the key range: `key < fraction * 2**64` is `key < bound`."""
    return math.ceil(fraction * 2**KEY_BITS)


def _in_band(keys_N: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Whether each uint64 key is in [lo, hi), exactly (the bounds may be 2**64)."""
    top = 2**KEY_BITS - 1
    above = keys_N >= np.uint64(min(lo, top)) if lo <= top else np.zeros(len(keys_N), bool)
    below = keys_N < np.uint64(hi) if hi <= top else np.ones(len(keys_N), bool)
    return above & below


def _cap(keys_N: np.ndarray, flags_N: np.ndarray, cap: int | None) -> np.ndarray:
    """Keeps the flagged keys with the lowest values, at most `cap` records, never splitting copies."""
    if cap is None or flags_N.sum() <= cap:
        return flags_N
    unique_U, counts_U = np.unique(keys_N[flags_N], return_counts=True)  # sorted
    kept_U = unique_U[np.cumsum(counts_U) <= cap]
    return flags_N & np.isin(keys_N, kept_U)


def assign_splits(
    keys_N: np.ndarray,
    eval_fraction: float,
    max_eval: int | None = None,
    valid_fraction: float = 0.0,
    max_valid: int | None = None,
) -> np.ndarray:
    """Decides the split of every record of a task from its `record_key`.

    Args:
        keys_N: One `record_key` per record (uint64), in any order.
        eval_fraction: The expected share of records in eval, in [0, 1].
        max_eval: If set, eval keeps at most this many records: those with the lowest keys. Copies of
            one record are never split across the cap, so eval may hold a little fewer.
        valid_fraction: The expected share of records in valid (the next band of keys after eval's).
        max_valid: The same cap for valid.

    Returns:
        One code per key (int8): the index of its split in `SPLITS` (0 train, 1 eval, 2 valid).
    """
    check_split(eval_fraction, max_eval, valid_fraction, max_valid)
    keys_N = np.asarray(keys_N, dtype=np.uint64)
    sides_N = np.zeros(len(keys_N), np.int8)
    eval_end = _bound(eval_fraction)
    bands = ((1, 0, eval_end, max_eval), (2, eval_end, _bound(eval_fraction + valid_fraction), max_valid))
    for code, lo, hi, cap in bands:
        sides_N[_cap(keys_N, _in_band(keys_N, lo, hi), cap)] = code
    return sides_N


def assign_eval(keys: Sequence[int], eval_fraction: float, max_eval: int | None = None) -> list[bool]:
    """Decides the side of every record of a task from its `record_key` (no valid split).

    Args:
        keys: One `record_key` per record, in any order.
        eval_fraction: The expected share of records in eval, in [0, 1].
        max_eval: If set, eval keeps at most this many records: those with the lowest keys. Copies of
            one record are never split across the cap, so eval may hold a little fewer.

    Returns:
        One flag per key, True for eval.
    """
    return (assign_splits(np.array(keys, dtype=np.uint64), eval_fraction, max_eval) == 1).tolist()


def is_eval(record: Any, eval_fraction: float) -> bool:
    """Whether a record belongs to the eval split, before any cap on the eval size.

    Args:
        record: The raw record (any JSON value), exactly as read from the task file.
        eval_fraction: The expected share of records in eval, in [0, 1].
    """
    check_split(eval_fraction)
    return bool(_in_band(np.array([record_key(record)], np.uint64), 0, _bound(eval_fraction))[0])


def split_task(
    path: Path,
    eval_fraction: float,
    max_eval: int | None = None,
    valid_fraction: float = 0.0,
    max_valid: int | None = None,
) -> dict[str, list[Example]]:
    """Reads one JSONL task and splits its records, as `tokenize_tasks` does.

    Evaluation code can call this with a manifest's `source` and split settings to get the raw held-out
    records (for generation metrics, say) without storing them twice.

    Returns:
        `{"train": [...], "eval": [...], "valid": [...]}`, each in file and line order.

    Raises:
        ValueError: On bad settings, or a malformed or empty task.
    """
    examples = list(read_task(path))
    keys_N = np.array([record_key(e.record) for e in examples], dtype=np.uint64)
    sides_N = assign_splits(keys_N, eval_fraction, max_eval, valid_fraction, max_valid)
    return {
        split: [e for e, s in zip(examples, sides_N, strict=True) if s == code]
        for code, split in enumerate(SPLITS)
    }
