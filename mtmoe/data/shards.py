"""Tokenized task shards and their manifest: reading them (`mtmoe.data.build.tokenize_tasks` writes them).

Layout under the output folder:

    manifest.json                 settings and per-task, per-split counts
    <task>/<split>/ids.npy        int32, every sample's token ids, back to back
    <task>/<split>/mask.npy       uint8, same length; 1 where the token is a prediction target
    <task>/<split>/offsets.npy    int64, N + 1; sample i is ids[offsets[i]:offsets[i + 1]]
    <task>/eval/refs.jsonl        one `Reference` per held-out sample, for a task with a metric

Splits are `train`, `eval` (what the report scores) and, with a valid fraction, `valid` (what CoBa and
Quality Retaining watch). The mask is not shifted: `mask[i] = 1` means token i is predicted (from the
tokens before it).

Manifest versions: 2 adds `valid_fraction`, `max_valid`, the `valid` split, the per-reason cut
counts and each task's `source_options`. Version 1 still loads: its `overflow: truncate` was a cut
from the right, and reads as `truncate-right`; its missing counts read as 0. The shard files are the
same in both.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mtmoe.data.references import MetricSpec, Reference, read_references
from mtmoe.data.truncate import CUTS, DROPS

MANIFEST = "manifest.json"
VERSION = 2
READABLE_VERSIONS = (1, 2)
# Per task and split: records read, samples kept, their tokens and loss tokens, kept samples that were
# cut (`truncated`) and by which cut (a sample may have several), and the drops by reason.
COUNTS = ("records", "samples", "tokens", "loss_tokens", "truncated", *CUTS, *DROPS)


@dataclass(kw_only=True)
class TaskInfo:
    """One task of a manifest.

    `splits` maps a split name to its counts (`COUNTS`): `records` read, `samples` kept, `tokens` and
    `loss_tokens` of the kept samples, `truncated` (kept, but cut to `max_len`) with each kind of cut
    (`mtmoe.data.truncate.CUTS`; a sample may have several), and the drops by reason
    (`dropped_too_long`, `dropped_no_target`: records - samples = the two drop counts).
    `metric` is the task's declared `MetricSpec` in JSON form (None: the task is scored by loss only).
    `source` is the path (or `hf:NAME`) the task was read from, and `source_options` the per-task options
    it was read with (`TaskSource.options`; None: none).
    """

    name: str
    id: int
    source: str
    splits: dict[str, dict[str, int]]
    metric: dict[str, Any] | None = None
    source_options: dict[str, Any] | None = None

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
    valid_fraction: float = 0.0
    max_valid: int | None = None
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

    A version 1 manifest is read as version 2 (see the module doc); `version` says which it was.

    Raises:
        ValueError: If the manifest is missing, unreadable or of a version this code cannot read.
    """
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise ValueError(f"{path}: no manifest; run data_prep/tokenize_tasks.py --out {root} first")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("version") not in READABLE_VERSIONS:
            raise ValueError(
                f"version {data.get('version')!r}, this mtmoe reads versions {list(READABLE_VERSIONS)};"
                " tokenize the tasks again with this mtmoe"
            )
        tasks = [TaskInfo(**t) for t in data.pop("tasks")]
        if data["version"] == 1:
            data["overflow"] = {"truncate": "truncate-right"}.get(data["overflow"], data["overflow"])
            for task in tasks:
                task.splits = {split: dict.fromkeys(COUNTS, 0) | c for split, c in task.splits.items()}
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


def validation_split(manifest: Manifest, tasks: Sequence[str]) -> str:
    """The split that CoBa and Quality Retaining watch.

    `valid` when every one of `tasks` has valid samples, else `eval` (a version 1 manifest, or tokenized
    without a valid fraction), which the report also scores.
    """
    has_valid = all(manifest.task(name).splits.get("valid", {}).get("samples", 0) > 0 for name in tasks)
    return "valid" if has_valid else "eval"


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
