"""Tokenizing a task's dataset with `datasets.map`: parallel (`num_proc`), cached by fingerprint.

Each row becomes one output row, in the same order: its split key (`record_key`, before any system
template), the fitted token ids and loss mask (empty when dropped), the cuts made (a bitmask over
`CUTS`), the drop (an index into `DROPS`, or -1), and, for a task with a metric, its reference as JSON.

The output's fingerprint is computed here from everything that decides it: the source's own fingerprint
(`datasets` derives it from the files, or the saved dataset's state), the row reader, the settings, the
tokenizer (its vocabulary, chat template and special tokens), the metric check and the source code of
the encoding modules. The Arrow files go to `<cache_dir>/mtmoe-tokenized/<fingerprint>*.arrow`; a
second run with the same inputs and settings reads them back instead of tokenizing.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa

from mtmoe.data.encode import encode_turns, end_marker_ids
from mtmoe.data.formats import parse_record
from mtmoe.data.references import MetricSpec, Reference, reference_from
from mtmoe.data.sources import RowReader, mapped_record, with_system
from mtmoe.data.split import record_key
from mtmoe.data.truncate import CUTS, DROPS, fit_pieces

OUTPUT = datasets.Features(
    {
        "key": datasets.Value("uint64"),
        "ids": datasets.List(datasets.Value("int32")),
        "mask": datasets.List(datasets.Value("uint8")),
        "cuts": datasets.Value("uint8"),
        "drop": datasets.Value("int8"),
        "ref": datasets.Value("string"),
    }
)
CACHE = "mtmoe-tokenized"
BATCH = 256  # rows per call of the encoder
_CODE = (
    "encode.py",
    "formats.py",
    "references.py",
    "sources.py",
    "split.py",
    "tokenize_map.py",
    "truncate.py",
)
Check = Callable[[MetricSpec, Reference], None]  # raises ValueError for a record the metric cannot score


@dataclass(frozen=True, kw_only=True)
class EncodeSettings:
    """What decides a task's tokenized rows, besides its records and the tokenizer."""

    max_len: int
    overflow: str
    columns: tuple[tuple[str, str], ...] = ()
    system: str | None = None
    metric: MetricSpec | None = None


def _column(values: list, feature: Any) -> pa.Array:
    """An output column as Arrow, token lists flattened in C rather than cast element by element."""
    if isinstance(feature, datasets.List):
        lengths = np.fromiter(map(len, values), dtype=np.int32, count=len(values))
        offsets = np.concatenate([np.zeros(1, np.int32), np.cumsum(lengths, dtype=np.int32)])
        flat = np.fromiter(
            itertools.chain.from_iterable(values), dtype=feature.feature.dtype, count=int(offsets[-1])
        )
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))
    return pa.array(values, type=feature.pa_type)


class RowEncoder:
    """The `datasets.map` function: a batch of source rows to tokenized rows (picklable for `num_proc`).

    Args:
        tokenizer: A Hugging Face tokenizer with a chat template.
        reader: Turns a source row into `(where, record)`.
        settings: The fitting, mapping and metric settings.
        check: With a metric: called with each record's reference, raises ValueError for one the metric
            cannot score (`mtmoe.eval.metrics.check_reference`). None accepts every reference.
    """

    def __init__(self, tokenizer: Any, reader: RowReader, settings: EncodeSettings, check: Check | None):
        self.tokenizer, self.reader, self.settings, self.check = tokenizer, reader, settings, check
        self.end_ids = end_marker_ids(tokenizer)

    def __call__(self, batch: dict[str, list], indices: list[int]) -> pa.Table:
        """Encodes a batch of rows (`indices`: their row numbers); raises ValueError naming a bad row."""
        out: dict[str, list] = {name: [] for name in OUTPUT}
        for j, index in enumerate(indices):
            where, raw = self.reader.record({c: values[j] for c, values in batch.items()}, index)
            try:
                row = self._encode(raw, where)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            for name, value in row.items():
                out[name].append(value)
        columns = {name: _column(values, OUTPUT[name]) for name, values in out.items()}
        return pa.table(columns, schema=OUTPUT.arrow_schema)

    def _encode(self, raw: Any, where: str) -> dict[str, Any]:
        s = self.settings
        record = mapped_record(raw, dict(s.columns))
        key = record_key(record)
        record = with_system(record, s.system, raw)
        messages = parse_record(record)
        pieces = encode_turns(self.tokenizer, messages, self.end_ids)
        fit = fit_pieces(pieces, s.max_len, s.overflow, self.tokenizer.bos_token_id)
        ref = ""
        if s.metric is not None:
            reference = reference_from(record, messages, where, fit.first_turn)
            if self.check is not None:
                self.check(s.metric, reference)
            ref = json.dumps(asdict(reference), ensure_ascii=False)
        cuts = sum(1 << CUTS.index(r) for r in fit.reasons if r in CUTS)
        drop = DROPS.index(fit.reasons[0]) if fit.dropped else -1
        return {"key": key, "ids": fit.ids, "mask": fit.mask, "cuts": cuts, "drop": drop, "ref": ref}


def tokenizer_digest(tokenizer: Any) -> str:
    """A hash of what the tokenizer encodes by: its vocabulary and rules, chat template and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    rules = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = [type(tokenizer).__name__, tokenizer.chat_template, str(tokenizer.special_tokens_map)]
    return hashlib.sha1("\0".join([rules, *map(str, extra)]).encode("utf-8")).hexdigest()


def fingerprint(ds: datasets.Dataset, encoder: RowEncoder, tokenizer_hash: str) -> str:
    """The output's fingerprint (see the module doc)."""
    code = Path(__file__).parent
    parts = {
        "source": ds._fingerprint,  # datasets' own fingerprint of the source rows
        "reader": repr(encoder.reader),
        "settings": repr(encoder.settings),
        "tokenizer": tokenizer_hash,
        "check": None
        if encoder.check is None
        else getattr(encoder.check, "__qualname__", repr(encoder.check)),
        "code": [hashlib.sha1((code / name).read_bytes()).hexdigest() for name in _CODE],
    }
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()[:24]


def cache_files(cache_dir: Path, fp: str, num_proc: int) -> list[Path]:
    """The Arrow files `datasets.map` writes for this fingerprint and process count."""
    base = Path(cache_dir) / CACHE
    if num_proc <= 1:
        return [base / f"{fp}.arrow"]
    return [base / f"{fp}_{rank:05d}_of_{num_proc:05d}.arrow" for rank in range(num_proc)]


def tokenize_dataset(
    ds: datasets.Dataset, encoder: RowEncoder, fp: str, num_proc: int, cache_dir: Path
) -> tuple[datasets.Dataset, bool]:
    """Tokenizes every row of `ds` (or reads the cached result).

    Args:
        ds: The task's source rows.
        encoder: The row encoder.
        fp: The output's `fingerprint`.
        num_proc: Worker processes (1: this process).
        cache_dir: The cache root.

    Returns:
        The tokenized rows (memory-mapped, `OUTPUT`'s columns, in source order), and whether they came
        from the cache.

    Raises:
        ValueError: On a bad record, naming where it came from.
    """
    num_proc = max(1, min(num_proc, len(ds)))  # as `datasets` does, so the file names agree
    files = cache_files(cache_dir, fp, num_proc)
    cached = all(f.is_file() for f in files)
    files[0].parent.mkdir(parents=True, exist_ok=True)
    out = ds.map(
        encoder,
        batched=True,
        batch_size=BATCH,
        with_indices=True,
        remove_columns=ds.column_names,
        features=OUTPUT,
        num_proc=num_proc if num_proc > 1 else None,
        cache_file_name=str(files[0].parent / f"{fp}.arrow"),
        new_fingerprint=fp,
        desc="tokenizing",
    )
    return out, cached
