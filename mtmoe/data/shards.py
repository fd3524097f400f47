"""Tokenized task shards and their manifest: the writer (`tokenize_tasks`) and the readers.

Layout under the output folder:

    manifest.json                 settings and per-task, per-split counts
    <task>/<split>/ids.npy        int32, every sample's token ids, back to back
    <task>/<split>/mask.npy       uint8, same length; 1 where the token is a prediction target
    <task>/<split>/offsets.npy    int64, N + 1; sample i is ids[offsets[i]:offsets[i + 1]]
    <task>/eval/refs.jsonl        one `Reference` per held-out sample, for a task with a metric

The mask is not shifted: `mask[i] = 1` means token i is predicted (from the tokens before it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mtmoe.data.encode import encode_messages
from mtmoe.data.formats import Example
from mtmoe.data.references import MetricSpec, Reference, read_references, reference_of, write_references
from mtmoe.data.split import check_split, split_task

MANIFEST = "manifest.json"
VERSION = 1
OVERFLOW_POLICIES = ("truncate", "drop")
COUNTS = ("records", "samples", "tokens", "loss_tokens", "truncated", "dropped_too_long", "dropped_no_target")
_TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
Sample = tuple[np.ndarray, np.ndarray]  # (ids int32, loss_mask uint8)
RefCheck = Callable[[Reference], None]  # raises ValueError for a record the task's metric cannot score


@dataclass(kw_only=True)
class TaskInfo:
    """One task of a manifest.

    `splits` maps a split name to its counts: `records` read, `samples` kept, `tokens` and
    `loss_tokens` of the kept samples, and `truncated` (kept, but cut to `max_len`),
    `dropped_too_long` and `dropped_no_target` (records - samples = the two drop counts).
    `metric` is the task's declared `MetricSpec` in JSON form (None: the task is scored by loss only).
    """

    name: str
    id: int
    source: str
    splits: dict[str, dict[str, int]]
    metric: dict[str, Any] | None = None

    @property
    def metric_spec(self) -> MetricSpec | None:
        """The declared metric, or None."""
        return None if self.metric is None else MetricSpec.from_json(self.metric)


@dataclass(kw_only=True)
class Manifest:
    """What `tokenize_tasks` wrote: settings and tasks, in task-id order."""

    root: Path
    tokenizer: str
    max_len: int
    overflow: str
    tasks: list[TaskInfo]
    eval_fraction: float = 0.0
    max_eval: int | None = None
    vocab_size: int | None = None
    version: int = VERSION

    def task(self, name: str) -> TaskInfo:
        """Looks a task up by name.

        Raises:
            ValueError: If there is no such task; the message lists the known ones.
        """
        for info in self.tasks:
            if info.name == name:
                return info
        known = [t.name for t in self.tasks]
        raise ValueError(f"unknown task {name!r} in {self.root / MANIFEST}; known: {known}")

    def to_json(self) -> dict[str, Any]:
        """The manifest as written to `manifest.json` (without `root`)."""
        data = asdict(self)
        del data["root"]
        tasks = data.pop("tasks")
        return {"version": data.pop("version"), **data, "tasks": tasks}


def load_manifest(root: Path) -> Manifest:
    """Reads `root/manifest.json`.

    Raises:
        ValueError: If the manifest is missing, unreadable or of another version.
    """
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise ValueError(f"{path}: no manifest; run data_prep/tokenize_tasks.py --out {root} first")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("version") != VERSION:
            raise ValueError(f"version {data.get('version')!r}, expected {VERSION}")
        tasks = [TaskInfo(**t) for t in data.pop("tasks")]
        return Manifest(root=root, tasks=tasks, **data)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"{path}: not a valid manifest: {e}") from None


@dataclass(frozen=True, kw_only=True, eq=False)  # arrays do not compare as booleans
class TaskShard:
    """One task's split, memory-mapped: `shard[i]` is `(ids int32, loss_mask uint8)` of sample i."""

    name: str
    task_id: int
    split: str
    ids: np.ndarray = field(repr=False)
    mask: np.ndarray = field(repr=False)
    offsets: np.ndarray = field(repr=False)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} out of range for {self.name}/{self.split} of {n} samples")
        i %= n
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.ids[start:end], self.mask[start:end]

    @property
    def lengths(self) -> np.ndarray:
        """The token count of every sample (int64, length N)."""
        return np.diff(self.offsets)


def open_shard(manifest: Manifest, task: str, split: str) -> TaskShard:
    """Memory-maps one task's split (the arrays are read-only).

    Raises:
        ValueError: On an unknown task or split, or shard files that do not match the manifest.
    """
    info = manifest.task(task)
    if split not in info.splits:
        raise ValueError(f"task {task!r} has no split {split!r}; known: {list(info.splits)}")
    folder = manifest.root / task / split
    try:
        ids, mask, offsets = (np.load(folder / f"{a}.npy", mmap_mode="r") for a in ("ids", "mask", "offsets"))
    except OSError as e:
        raise ValueError(f"{folder}: cannot read the shard: {e}") from None
    n = info.splits[split]["samples"]
    if len(offsets) != n + 1 or len(ids) != len(mask) or int(offsets[-1]) != len(ids):
        raise ValueError(f"{folder}: the shard does not match {manifest.root / MANIFEST}; tokenize again")
    return TaskShard(name=task, task_id=info.id, split=split, ids=ids, mask=mask, offsets=offsets)


def open_references(manifest: Manifest, task: str) -> list[Reference]:
    """The held-out references of a task that declared a metric, in sample order.

    Raises:
        ValueError: For an unknown task, a task without a metric, or a reference file that does not match
            the manifest.
    """
    info = manifest.task(task)
    if info.metric is None:
        raise ValueError(f"task {task!r} declares no metric in {manifest.root / MANIFEST}")
    refs = read_references(manifest.root / task / "eval")
    if len(refs) != info.splits["eval"]["samples"]:
        raise ValueError(f"{manifest.root / task / 'eval'}: the references do not match the manifest")
    return refs


def _write_split(folder: Path, samples: list[Sample]) -> None:
    folder.mkdir(parents=True)
    lengths = np.array([len(ids) for ids, _ in samples], dtype=np.int64)
    offsets = np.concatenate([np.zeros(1, np.int64), np.cumsum(lengths)])
    ids = np.concatenate([s[0] for s in samples]) if samples else np.zeros(0, np.int32)
    mask = np.concatenate([s[1] for s in samples]) if samples else np.zeros(0, np.uint8)
    np.save(folder / "ids.npy", ids.astype(np.int32, copy=False))
    np.save(folder / "mask.npy", mask.astype(np.uint8, copy=False))
    np.save(folder / "offsets.npy", offsets)


def _encode_split(
    examples: list[Example], tokenizer: Any, max_len: int, overflow: str, check: RefCheck | None = None
) -> tuple[list[Sample], dict[str, int], list[Reference]]:
    """Encodes one split and fits it to `max_len`.

    Returns:
        The kept samples, the counts, and (with `check`, for a task with a metric) each kept sample's
        reference, every record's reference having passed `check`.
    """
    samples: list[Sample] = []
    refs: list[Reference] = []
    c = dict.fromkeys(COUNTS, 0)
    for example in examples:
        c["records"] += 1
        try:
            ids, mask = encode_messages(tokenizer, example.messages)
            ref = None
            if check is not None:
                ref = reference_of(example)
                check(ref)
        except ValueError as e:
            raise ValueError(f"{example.where}: {e}") from None
        truncated = len(ids) > max_len
        if truncated and overflow == "drop":
            c["dropped_too_long"] += 1
            continue
        ids, mask = ids[:max_len], mask[:max_len]
        if not any(mask):
            c["dropped_no_target"] += 1
            continue
        c["truncated"] += int(truncated)
        c["samples"] += 1
        c["tokens"] += len(ids)
        c["loss_tokens"] += sum(mask)
        samples.append((np.asarray(ids, np.int32), np.asarray(mask, np.uint8)))
        if ref is not None:
            refs.append(ref)
    return samples, c, refs


def _accept(spec: MetricSpec, ref: Reference) -> None:
    """The check of a metric without requirements."""


def _resolve_spec(spec: MetricSpec, refs: list[Reference], tokenizer: Any) -> MetricSpec:
    """`spec` with its automatic generation cap resolved: the longest reference answer plus 8 tokens."""
    if spec.max_new_tokens > 0:
        return spec
    longest = max((len(tokenizer(r.answer, add_special_tokens=False)["input_ids"]) for r in refs), default=0)
    return MetricSpec(name=spec.name, max_new_tokens=longest + 8, labels=spec.labels)


def _summary(info: TaskInfo) -> str:
    parts = [f"{info.name} (id {info.id}):"]
    for split, c in info.splits.items():
        parts.append(
            f"{split} {c['samples']}/{c['records']} samples, {c['tokens']} tokens ({c['loss_tokens']} loss),"
            f" truncated {c['truncated']}, dropped too long {c['dropped_too_long']},"
            f" dropped no target {c['dropped_no_target']};"
        )
    return " ".join(parts).rstrip(";")


def _replace_dir(tmp: Path, out: Path) -> None:
    """Moves a finished folder into place; the previous output is removed only after that."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def tokenize_tasks(
    tasks: Mapping[str, Path],
    tokenizer: Any,
    tokenizer_path: str,
    max_len: int,
    overflow: str,
    eval_fraction: float,
    max_eval: int | None,
    out: Path,
    log: Callable[[str], None] = print,
    metrics: Mapping[str, MetricSpec] | None = None,
    check: Callable[[MetricSpec, Reference], None] | None = None,
) -> Manifest:
    """Tokenizes task JSONL files into per-task, per-split shards and writes the manifest.

    Everything is built in a temporary sibling folder that replaces `out` only once complete, so a
    crash never leaves a half-written manifest or shards that disagree with it.

    Args:
        tasks: Task name to JSONL file or folder; task ids follow this order, from 0.
        tokenizer: A Hugging Face tokenizer with a chat template.
        tokenizer_path: How to find the tokenizer again (a folder or an alias), recorded in the manifest.
        max_len: Longest sample, in tokens.
        overflow: `truncate` cuts longer samples to `max_len` (dropping those left without a target
            token); `drop` drops them.
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

    Returns:
        The manifest, as `load_manifest(out)` would return it.

    Raises:
        ValueError: On bad settings or task names, a malformed or empty task (naming file and line),
            or an `out` folder that is not a previous output.
    """
    if overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"overflow must be one of {list(OVERFLOW_POLICIES)}, got {overflow!r}")
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    check_split(eval_fraction, max_eval)
    if not tasks:
        raise ValueError("no task given")
    for name in tasks:
        if not _TASK_NAME.fullmatch(name):
            raise ValueError(f"task name {name!r}: use letters, digits, '_', '-', '.' (not first)")
    metrics = dict(metrics or {})
    if unknown := sorted(set(metrics) - set(tasks)):
        raise ValueError(f"a metric is declared for unknown task(s) {unknown}; tasks: {list(tasks)}")
    out = Path(out)
    if out.exists() and not (out / MANIFEST).is_file() and any(out.iterdir()):
        raise ValueError(f"{out}: exists and holds no {MANIFEST}; refusing to replace it")

    target = out.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        infos = []
        for task_id, (name, path) in enumerate(tasks.items()):
            counts, spec = {}, metrics.get(name)
            ref_check = None
            if spec is not None:
                ref_check = (lambda ref, spec=spec: check(spec, ref)) if check else (lambda ref: None)
            for split, examples in split_task(Path(path), eval_fraction, max_eval).items():
                samples, counts[split], refs = _encode_split(
                    examples, tokenizer, max_len, overflow, ref_check
                )
                _write_split(tmp / name / split, samples)
                if spec is not None and split == "eval":
                    write_references(tmp / name / split, refs)
                    spec = _resolve_spec(spec, refs, tokenizer)
            metric = None if spec is None else spec.to_json()
            infos.append(TaskInfo(name=name, id=task_id, source=str(path), splits=counts, metric=metric))
            log(_summary(infos[-1]))
        manifest = Manifest(
            root=out,
            tokenizer=tokenizer_path,
            max_len=max_len,
            overflow=overflow,
            tasks=infos,
            eval_fraction=eval_fraction,
            max_eval=max_eval,
            vocab_size=len(tokenizer),
        )
        (tmp / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2) + "\n", encoding="utf-8")
        _replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest
