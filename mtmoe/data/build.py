"""Writing tokenized task shards and their manifest (`tokenize_tasks`); `mtmoe.data.shards` reads them.

Only tokenization needs `datasets` and `pyarrow`: a training process imports `mtmoe.data.shards` alone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtmoe.data.references import MetricSpec, Reference
from mtmoe.data.shard_writer import write_shards
from mtmoe.data.shards import MANIFEST, Manifest, TaskInfo
from mtmoe.data.sources import TaskSource, open_source
from mtmoe.data.split import SPLITS, assign_splits, check_split
from mtmoe.data.tokenize_map import (
    Check,
    EncodeSettings,
    RowEncoder,
    fingerprint,
    tokenize_dataset,
    tokenizer_digest,
)
from mtmoe.data.truncate import CUTS, DROPS, OVERFLOW_POLICIES

_TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _resolve_spec(spec: MetricSpec, refs: list[Reference], tokenizer: Any) -> MetricSpec:
    """`spec` with its automatic generation cap resolved: the longest reference answer plus 8 tokens."""
    if spec.max_new_tokens > 0:
        return spec
    longest = max((len(tokenizer(r.answer, add_special_tokens=False)["input_ids"]) for r in refs), default=0)
    return MetricSpec(name=spec.name, max_new_tokens=longest + 8, labels=spec.labels)


def _summary(info: TaskInfo, cached: bool) -> str:
    parts = [f"{info.name} (id {info.id}{', tokens from the cache' if cached else ''}):"]
    for split, c in info.splits.items():
        reasons = ", ".join(f"{k} {c[k]}" for k in (*CUTS, *DROPS) if c[k])
        parts.append(
            f"{split} {c['samples']}/{c['records']} samples, {c['tokens']} tokens ({c['loss_tokens']} loss),"
            f" truncated {c['truncated']}, dropped too long {c['dropped_too_long']},"
            f" dropped no target {c['dropped_no_target']}{f' ({reasons})' if reasons else ''};"
        )
    return " ".join(parts).rstrip(";")


def _replace_dir(tmp: Path, out: Path) -> None:
    """Moves a finished folder into place; the previous output is removed only after that."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _check_settings(tasks: Mapping[str, Any], overflow: str, max_len: int, out: Path) -> None:
    if overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"overflow must be one of {list(OVERFLOW_POLICIES)}, got {overflow!r}")
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if not tasks:
        raise ValueError("no task given")
    for name in tasks:
        if not _TASK_NAME.fullmatch(name):
            raise ValueError(f"task name {name!r}: use letters, digits, '_', '-', '.' (not first)")
    if out.exists() and not (out / MANIFEST).is_file() and any(out.iterdir()):
        raise ValueError(f"{out}: exists and holds no {MANIFEST}; refusing to replace it")


def _source(path: Path | str | TaskSource) -> TaskSource:
    return path if isinstance(path, TaskSource) else TaskSource(path=str(path))


@dataclass(frozen=True)
class _Settings:
    """The settings shared by every task of a `tokenize_tasks` call."""

    eval_fraction: float
    max_eval: int | None
    valid_fraction: float
    max_valid: int | None
    num_proc: int
    max_len: int
    overflow: str


@dataclass(frozen=True)
class _Task:
    name: str
    id: int
    source: TaskSource
    spec: MetricSpec | None


def _tokenize_task(
    task: _Task, tokenizer: Any, tok_hash: str, s: _Settings, tmp: Path, work: Path, check: Check | None
) -> tuple[TaskInfo, bool]:
    """Reads, tokenizes, splits and writes one task; returns its manifest entry and whether it was cached."""
    ds, reader = open_source(task.source, work, s.num_proc)
    columns = tuple(task.source.columns.items())
    settings = EncodeSettings(
        max_len=s.max_len, overflow=s.overflow, columns=columns, system=task.source.system, metric=task.spec
    )
    encoder = RowEncoder(tokenizer, reader, settings, check if task.spec is not None else None)
    rows, cached = tokenize_dataset(ds, encoder, fingerprint(ds, encoder, tok_hash), s.num_proc, work)
    keys_N = rows.data.column("key").to_numpy()
    sides_N = assign_splits(keys_N, s.eval_fraction, s.max_eval, s.valid_fraction, s.max_valid)
    splits = SPLITS if s.valid_fraction > 0 else SPLITS[:2]
    refs_split = "eval" if task.spec is not None else None
    counts, refs = write_shards(rows, sides_N, tmp / task.name, splits, refs_split)
    spec = task.spec if task.spec is None else _resolve_spec(task.spec, refs, tokenizer)
    metric = None if spec is None else spec.to_json()
    info = TaskInfo(
        name=task.name, id=task.id, source=task.source.path, splits=counts, metric=metric,
        source_options=task.source.options(),
    )  # fmt: skip
    return info, cached


def tokenize_tasks(
    tasks: Mapping[str, Path | str | TaskSource],
    tokenizer: Any,
    tokenizer_path: str,
    max_len: int,
    overflow: str,
    eval_fraction: float,
    max_eval: int | None,
    out: Path,
    log: Callable[[str], None] = print,
    metrics: Mapping[str, MetricSpec] | None = None,
    check: Check | None = None,
    *,
    valid_fraction: float = 0.0,
    max_valid: int | None = None,
    num_proc: int = 1,
    cache_dir: Path | None = None,
) -> Manifest:
    """Tokenizes tasks into per-task, per-split shards and writes the manifest.

    Each task is read as a dataset (`mtmoe.data.sources`), tokenized by `datasets.map` in `num_proc`
    processes (`mtmoe.data.tokenize_map`), split by the hash of each record, and streamed into its shards
    (`mtmoe.data.shard_writer`). Everything is built in a temporary sibling folder that replaces `out`
    only once complete, so a crash never leaves a half-written manifest or shards that disagree with it.

    Args:
        tasks: Task name to its source: a path (JSONL, parquet, arrow, CSV or JSON file or folder, a saved
            dataset, `hf:NAME`) or a `TaskSource` with options; task ids follow this order, from 0.
        tokenizer: A Hugging Face tokenizer with a chat template.
        tokenizer_path: How to find the tokenizer again (a folder or an alias), recorded in the manifest.
        max_len: Longest sample, in tokens.
        overflow: One of `OVERFLOW_POLICIES` (see `mtmoe.data.truncate`): `truncate` and
            `truncate-middle` shorten the prompt and keep the answer, `truncate-right` cuts from the
            right, `drop` drops longer samples. A sample left without a target token is dropped.
        eval_fraction: Share of each task's records held out for eval, by a hash of the record.
        max_eval: If set, at most this many eval records per task (the rest go to train).
        out: Output folder. If it exists it must hold a previous manifest; it is replaced.
        log: Where the per-task summary lines go.
        metrics: Task name to its declared metric; tasks not listed are scored by loss only. Their
            held-out references go to `<task>/eval/refs.jsonl`; a `max_new_tokens` of 0 becomes the
            longest reference answer plus 8 tokens.
        check: Called with each record's reference of a task with a metric (train and eval, so the
            split never decides what is accepted); raises ValueError for a record the metric cannot
            score. `mtmoe.eval.metrics.check_reference` is the one to pass.
        valid_fraction: Share of each task's records held out for validation (CoBa, Quality Retaining),
            by the next band of the same hash, so eval does not change; 0 writes no `valid` split.
        max_valid: If set, at most this many valid records per task (the rest go to train).
        num_proc: Processes that tokenize.
        cache_dir: Where the tokenized rows are kept, by fingerprint, for the next run; None keeps them
            only while this call runs.

    Returns:
        The manifest, as `load_manifest(out)` would return it.

    Raises:
        ValueError: On bad settings or task names, a malformed or empty task (naming file and line, or
            the dataset's row), or an `out` folder that is not a previous output.
    """
    out = Path(out)
    _check_settings(tasks, overflow, max_len, out)
    check_split(eval_fraction, max_eval, valid_fraction, max_valid)
    if num_proc < 1:
        raise ValueError(f"num_proc must be >= 1, got {num_proc}")
    metrics = dict(metrics or {})
    if unknown := sorted(set(metrics) - set(tasks)):
        raise ValueError(f"a metric is declared for unknown task(s) {unknown}; tasks: {list(tasks)}")
    settings = _Settings(eval_fraction, max_eval, valid_fraction, max_valid, num_proc, max_len, overflow)

    target = out.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    work = (
        Path(cache_dir) if cache_dir is not None else target.with_name(f".{target.name}.cache-{os.getpid()}")
    )
    try:
        tok_hash = tokenizer_digest(tokenizer)
        infos = []
        for task_id, (name, path) in enumerate(tasks.items()):
            task = _Task(name, task_id, _source(path), metrics.get(name))
            info, cached = _tokenize_task(task, tokenizer, tok_hash, settings, tmp, work, check)
            infos.append(info)
            log(_summary(info, cached))
        manifest = Manifest(
            root=out,
            tokenizer=tokenizer_path,
            max_len=max_len,
            overflow=overflow,
            tasks=infos,
            eval_fraction=eval_fraction,
            max_eval=max_eval,
            valid_fraction=valid_fraction,
            max_valid=max_valid,
            vocab_size=len(tokenizer),
        )
        (tmp / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2) + "\n", encoding="utf-8")
        _replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if cache_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return manifest
