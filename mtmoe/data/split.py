"""Train / eval split by a fixed hash of each record, never by its position.

A record's side depends only on its content: the SHA-1 of its canonical JSON (keys sorted, no
spaces, its tests left out), read as a number in [0, 1). A record lands in eval when that number is
below the eval fraction, so adding, removing or reordering other records never moves it, and exact
duplicates always land together. An optional cap keeps only the eval records with the lowest hashes
and returns the rest to train, which is just as stable.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mtmoe.data.formats import Example, read_task

KEY_BITS = 64
SPLITS = ("train", "eval")
EVAL_ONLY_KEYS = ("test", "entry_point", "code_prefix")  # see `mtmoe.data.references`


def record_key(record: Any) -> int:
    """The record's split key: the first 64 bits of the SHA-1 of its canonical JSON.

    The evaluation-only fields (`EVAL_ONLY_KEYS`: a record's tests) are left out, so adding tests to a
    task does not move its records between the splits.
    """
    if isinstance(record, dict):
        record = {k: v for k, v in record.items() if k not in EVAL_ONLY_KEYS}
    canonical = json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return int.from_bytes(hashlib.sha1(canonical.encode("utf-8")).digest()[: KEY_BITS // 8], "big")


def check_split(eval_fraction: float, max_eval: int | None = None) -> None:
    """Validates split settings.

    Raises:
        ValueError: If `eval_fraction` is outside [0, 1] or `max_eval` is negative.
    """
    if not 0.0 <= eval_fraction <= 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1], got {eval_fraction}")
    if max_eval is not None and max_eval < 0:
        raise ValueError(f"max_eval must be >= 0 or None, got {max_eval}")


def _key_is_eval(key: int, eval_fraction: float) -> bool:
    return key < eval_fraction * 2**KEY_BITS


def is_eval(record: Any, eval_fraction: float) -> bool:
    """Whether a record belongs to the eval split, before any cap on the eval size.

    Args:
        record: The raw record (any JSON value), exactly as read from the task file.
        eval_fraction: The expected share of records in eval, in [0, 1].
    """
    check_split(eval_fraction)
    return _key_is_eval(record_key(record), eval_fraction)


def assign_eval(keys: Sequence[int], eval_fraction: float, max_eval: int | None = None) -> list[bool]:
    """Decides the side of every record of a task from its `record_key`.

    Args:
        keys: One `record_key` per record, in any order.
        eval_fraction: The expected share of records in eval, in [0, 1].
        max_eval: If set, eval keeps at most this many records: those with the lowest keys. Copies of
            one record are never split across the cap, so eval may hold a little fewer.

    Returns:
        One flag per key, True for eval.
    """
    check_split(eval_fraction, max_eval)
    flags = [_key_is_eval(k, eval_fraction) for k in keys]
    if max_eval is not None and sum(flags) > max_eval:
        counts: dict[int, int] = {}
        for key, flag in zip(keys, flags, strict=True):
            if flag:
                counts[key] = counts.get(key, 0) + 1
        kept: set[int] = set()
        total = 0
        for key in sorted(counts):
            if total + counts[key] > max_eval:
                break
            kept.add(key)
            total += counts[key]
        flags = [flag and key in kept for key, flag in zip(keys, flags, strict=True)]
    return flags


def split_task(path: Path, eval_fraction: float, max_eval: int | None = None) -> dict[str, list[Example]]:
    """Reads one task and splits its records, as `tokenize_tasks` does.

    Evaluation code can call this with a manifest's `source`, `eval_fraction` and `max_eval` to get
    the raw held-out records (for generation metrics, say) without storing them twice.

    Returns:
        `{"train": [...], "eval": [...]}`, each in file and line order.

    Raises:
        ValueError: On bad settings, or a malformed or empty task.
    """
    check_split(eval_fraction, max_eval)
    examples = list(read_task(path))
    flags = assign_eval([record_key(e.record) for e in examples], eval_fraction, max_eval)
    train, held_out = SPLITS
    return {
        train: [e for e, f in zip(examples, flags, strict=True) if not f],
        held_out: [e for e, f in zip(examples, flags, strict=True) if f],
    }
