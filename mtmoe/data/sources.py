"""Where a task's records come from: JSONL, parquet, arrow, CSV or JSON files, saved datasets, the hub.

Every kind is opened as a `datasets.Dataset` (memory-mapped Arrow, never held in memory), with a
`RowReader` that turns one of its rows into a record dict:

- `.jsonl` files, or a folder of them: read by mtmoe itself, line by line, into a dataset of raw lines
  (`where`: `file:line`, `line`: the bytes), so that MFTCoder's schemas read unchanged and every bad line
  is named by file and line, as before.
- `.parquet`, `.arrow`, `.csv` or `.json` files, or a folder of one of these kinds: `datasets`' builders.
- a folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`: `datasets.load_from_disk`.
- `hf:NAME`: a hub dataset, when the machine is online (offline, a clear error; never a hang).

Dataset rows are named by their row index. A task may choose the dataset's config and split, a row
range, a column mapping (`{"prompt": "question", "answer": "label"}`: the record is then exactly the
mapped columns) and a system prompt template (`str.format` over the row's fields).
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import datasets

from mtmoe.data.formats import PAIR_SCHEMAS, task_files

HUB = "hf:"
BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json"}
TEXT_KEYS = frozenset({"system", "instruction"} | {key for pair in PAIR_SCHEMAS for key in pair})
_LINES = datasets.Features({"where": datasets.Value("string"), "line": datasets.Value("binary")})
_PROBE_TIMEOUT_S = 5.0
_OFFLINE_HINT = "save the dataset with `save_to_disk` on a machine that is online, and give that folder"


@dataclass(frozen=True, kw_only=True)
class TaskSource:
    """One task's input and how to read it.

    Attributes:
        path: A file or folder, or `hf:NAME` for a hub dataset.
        config: The dataset's config (hub datasets only).
        split: The dataset's split; default `train`.
        rows: `(start, end)`: only rows `start <= i < end` (end None: to the last); records, for JSONL.
        columns: Record key to dataset column (or JSONL key); the record is then exactly these keys.
        system: A system prompt template, `str.format`-ed with the row's fields (before any mapping); a
            record's own system prompt wins.
    """

    path: str
    config: str | None = None
    split: str | None = None
    rows: tuple[int, int | None] | None = None
    columns: Mapping[str, str] = field(default_factory=dict)
    system: str | None = None

    @property
    def is_hub(self) -> bool:
        """Whether the source is a hub dataset."""
        return self.path.startswith(HUB)

    def options(self) -> dict[str, Any] | None:
        """The options given, as the manifest records them beside the path (None: none)."""
        given = {"config": self.config, "split": self.split, "rows": self.rows, "system": self.system}
        given |= {"columns": dict(self.columns) or None}
        return {k: v for k, v in given.items() if v is not None} or None


@dataclass(frozen=True)
class JsonlRows:
    """Rows of raw JSONL lines; `record` decodes one."""

    def record(self, row: Mapping[str, Any], index: int) -> tuple[str, Any]:
        """`(where, record)` of one row; raises ValueError naming `file:line` on bad JSON."""
        where = row["where"]
        try:
            return where, json.loads(row["line"])  # bytes: UTF-8 (a BOM is accepted)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
            raise ValueError(f"{where}: bad JSON: {e}") from None


@dataclass(frozen=True)
class TableRows:
    """Rows of a dataset; `record` is the row's fields, named `<name> row <index>`."""

    name: str
    start: int = 0

    def record(self, row: Mapping[str, Any], index: int) -> tuple[str, Any]:
        """`(where, record)` of one row."""
        return f"{self.name} row {self.start + index}", dict(row)


RowReader = JsonlRows | TableRows


Chunk = tuple[str, int, int, int, int, int]  # file, start byte, end byte, its first line, size, mtime


def _jsonl_lines(chunks: list[Chunk]) -> Iterator[dict[str, Any]]:
    """The generator of a JSONL task's dataset: the non-blank lines of byte ranges that end at line ends.

    A chunk's size and mtime only key the cache.
    """
    for file, start, end, first_line, _, _ in chunks:
        with open(file, "rb") as f:
            f.seek(start)
            pos, line_no = start, first_line
            while pos < end and (line := f.readline()):
                if line.strip():
                    yield {"where": f"{file}:{line_no}", "line": line}
                pos, line_no = pos + len(line), line_no + 1


def jsonl_chunks(files: list[Path], parts: int, block: int = 1 << 20) -> list[Chunk]:
    """Splits each file at line ends into up to `parts` byte ranges, with the line number each starts at.

    The line numbers come from counting newlines block by block, so memory stays at one block.
    """
    chunks = []
    for path in files:
        stat = path.stat()
        size, cuts = stat.st_size, []
        with open(path, "rb") as f:
            for i in range(1, parts):  # the first line end at or after each even share of the bytes
                f.seek(max(size * i // parts - 1, 0))
                f.readline()
                if (cut := f.tell()) < size and (not cuts or cut > cuts[-1]):
                    cuts.append(cut)
            starts, ends, lines, pos, newlines = [0, *cuts], [*cuts, size], [1], 0, 0
            f.seek(0)
            for cut in cuts:  # newlines before each cut
                while pos < cut:
                    data = f.read(min(block, cut - pos))
                    newlines, pos = newlines + data.count(b"\n"), pos + len(data)
                lines.append(newlines + 1)
        chunks += [
            (str(path), s, e, n, size, stat.st_mtime_ns) for s, e, n in zip(starts, ends, lines, strict=True)
        ]
    return chunks


def _open_jsonl(path: Path, files: list[Path], cache_dir: Path, num_proc: int = 1) -> datasets.Dataset:
    if not any(_has_record(f) for f in files):  # `datasets` refuses a generator that yields nothing
        raise ValueError(f"{path}: empty task, no record found")
    chunks = [c for c in jsonl_chunks(files, num_proc) if c[2] > c[1]]
    num_proc = min(num_proc, len(chunks))
    return datasets.Dataset.from_generator(
        _jsonl_lines,
        features=_LINES,
        gen_kwargs={"chunks": chunks},
        cache_dir=str(cache_dir),
        num_proc=num_proc if num_proc > 1 else None,
    )


def _has_record(file: Path) -> bool:
    """Whether the file has a non-blank line (it stops at the first)."""
    with open(file, "rb") as f:
        return any(line.strip() for line in f)


def _pick_split(loaded: Any, source: TaskSource) -> datasets.Dataset:
    """The chosen split of a `DatasetDict`, or the `Dataset` itself."""
    if isinstance(loaded, datasets.DatasetDict):
        split = source.split or "train"
        if split not in loaded:
            raise ValueError(f"{source.path}: no split {split!r}; known: {sorted(loaded)}")
        return loaded[split]
    if source.split not in (None, "train"):
        raise ValueError(f"{source.path}: no split {source.split!r}; a saved Dataset is one split")
    return loaded


def _check_hub_reachable(name: str) -> None:
    """Fails fast, with a clear message, when the hub cannot be reached (offline: no network call)."""
    if datasets.config.HF_HUB_OFFLINE:
        return  # `datasets` answers from its local cache, or raises at once
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=_PROBE_TIMEOUT_S).close()
    except OSError as e:
        raise ValueError(
            f"{HUB}{name}: cannot reach the hub at {url.geturl()} ({e}); {_OFFLINE_HINT}"
        ) from None


def _open_hub(source: TaskSource, cache_dir: Path) -> datasets.Dataset:
    name = source.path[len(HUB) :]
    _check_hub_reachable(name)
    split = source.split or "train"
    try:
        return datasets.load_dataset(name, source.config, split=split, cache_dir=str(cache_dir))
    except ConnectionError as e:
        raise ValueError(
            f"{source.path}: the hub is not reachable (offline?): {e}; {_OFFLINE_HINT}"
        ) from None
    except (FileNotFoundError, ValueError) as e:  # an unknown dataset, config or split
        raise ValueError(f"{source.path}: {e}") from None


def _local_kind(path: Path) -> tuple[str, list[Path]]:
    """`(kind, files)` of a local source: kind is `jsonl`, `disk` or a builder name."""
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        return "disk", [path]
    if path.is_file() and path.suffix == ".jsonl":
        return "jsonl", [path]
    if path.is_file():
        if path.suffix not in BUILDERS:
            raise ValueError(
                f"{path}: unknown file kind {path.suffix!r}; expected .jsonl or {sorted(BUILDERS)}"
            )
        return BUILDERS[path.suffix], [path]
    if not path.is_dir():
        raise ValueError(f"{path}: no such task file or folder")
    found = {s: sorted(p for p in path.glob(f"*{s}") if p.is_file()) for s in (".jsonl", *BUILDERS)}
    found = {s: files for s, files in found.items() if files}
    if not found:
        raise ValueError(f"{path}: empty task, the folder holds no *.jsonl, {', '.join(BUILDERS)} file")
    if len(found) > 1:
        raise ValueError(f"{path}: the folder mixes file kinds {sorted(found)}; give one kind per task")
    suffix, files = next(iter(found.items()))
    return ("jsonl" if suffix == ".jsonl" else BUILDERS[suffix]), files


def _open_local(source: TaskSource, cache_dir: Path, num_proc: int = 1) -> tuple[datasets.Dataset, bool]:
    """The local source's dataset, and whether it is JSONL (rows of raw lines)."""
    path = Path(source.path)
    kind, files = _local_kind(path)
    if source.config is not None:
        raise ValueError(f"{path}: a config is chosen for a hub dataset only, got {source.config!r}")
    if kind == "jsonl":
        if source.split not in (None, "train"):
            raise ValueError(f"{path}: no split {source.split!r}; a JSONL task is one split")
        return _open_jsonl(path, task_files(path) if path.is_dir() else files, cache_dir, num_proc), True
    try:
        if kind == "disk":
            loaded = datasets.load_from_disk(str(path))
        else:
            data_files = [str(f) for f in files]
            loaded = datasets.load_dataset(kind, data_files=data_files, cache_dir=str(cache_dir))
    except (OSError, ValueError, datasets.exceptions.DatasetGenerationError) as e:
        raise ValueError(f"{path}: cannot read it as {kind}: {e}") from None
    return _pick_split(loaded, source), False


def _check_columns(ds: datasets.Dataset, source: TaskSource) -> None:
    """Refuses unknown mapped columns and text columns that do not hold strings, naming the column."""
    known = list(ds.column_names)
    if missing := sorted(set(source.columns.values()) - set(known)):
        raise ValueError(f"{source.path}: --columns names unknown column(s) {missing}; known: {known}")
    if source.columns:
        text = {column for key, column in source.columns.items() if key in TEXT_KEYS}
    else:
        pair = next((p for p in PAIR_SCHEMAS if set(p) <= set(known)), ())
        text = set() if "chat_rounds" in known else set(pair) | ({"system"} & set(known))
    for column in sorted(text):
        feature = ds.features[column]
        if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
            raise ValueError(f"{source.path}: column {column!r} holds {feature}, not strings")


def _select_rows(ds: datasets.Dataset, source: TaskSource) -> tuple[datasets.Dataset, int]:
    if source.rows is None:
        return ds, 0
    start, end = source.rows
    if start < 0:
        raise ValueError(f"{source.path}: rows {start}:{end}: the start must be >= 0")
    end = len(ds) if end is None else min(end, len(ds))
    if start >= end:
        raise ValueError(f"{source.path}: empty task, rows {start}:{end} of {len(ds)} select nothing")
    return ds.select(range(start, end)), start


def open_source(source: TaskSource, cache_dir: Path, num_proc: int = 1) -> tuple[datasets.Dataset, RowReader]:
    """Opens a task's records as a dataset and the reader of its rows.

    Args:
        source: The task's input and options.
        cache_dir: Where `datasets` keeps what it builds (Arrow files of JSONL lines, CSV and JSON).
        num_proc: Processes that read a JSONL task's lines (each a range of its bytes).

    Returns:
        The dataset (the chosen split and rows) and its `RowReader`.

    Raises:
        ValueError: For a missing or empty source, an unknown file kind, split or column, a text column
            that does not hold strings, or a hub dataset that cannot be reached.
    """
    if source.is_hub:
        ds, is_jsonl = _open_hub(source, cache_dir), False
    else:
        ds, is_jsonl = _open_local(source, cache_dir, num_proc)
    if not is_jsonl:
        _check_columns(ds, source)
    ds, start = _select_rows(ds, source)
    if len(ds) == 0:
        raise ValueError(f"{source.path}: empty task, no record found")
    return ds, JsonlRows() if is_jsonl else TableRows(source.path, start)


def mapped_record(record: Any, columns: Mapping[str, str]) -> Any:
    """The record with `columns` applied: exactly the mapped keys (unchanged without a mapping).

    Raises:
        ValueError: If the record lacks a mapped column (the caller adds where).
    """
    if not columns:
        return record
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, got {type(record).__name__}")
    if missing := [column for column in columns.values() if column not in record]:
        raise ValueError(f"no column(s) {missing} for --columns; the record has {sorted(record)}")
    return {key: record[column] for key, column in columns.items()}


def with_system(record: Any, template: str | None, fields: Any = None) -> Any:
    """The record with a system prompt from `template`, unless it has one of its own.

    Args:
        record: The record (after any column mapping).
        template: The system prompt, `str.format`-ed with `fields`; None leaves the record as it is.
        fields: The row's own fields (before the mapping); default the record's.

    Raises:
        ValueError: If the template names a field the row lacks, or is malformed.
    """
    if template is None or not isinstance(record, dict):
        return record
    fields = fields if isinstance(fields, dict) else record
    try:
        text = template.format_map(fields)
    except KeyError as e:
        raise ValueError(
            f"the system template names {e}, which the row lacks; it has {sorted(fields)}"
        ) from None
    except (ValueError, IndexError, AttributeError) as e:
        raise ValueError(f"the system template {template!r} is malformed: {e}") from None
    rounds = record.get("chat_rounds")
    if isinstance(rounds, list):
        if any(isinstance(t, dict) and str(t.get("role", "")).lower() == "system" for t in rounds):
            return record
        return {**record, "chat_rounds": [{"role": "system", "content": text}, *rounds]}
    return record if record.get("system") else {**record, "system": text}
