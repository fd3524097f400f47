"""Writing a task's tokenized rows into its split shards as a stream, and counting what was kept.

The rows (`mtmoe.data.tokenize_map.OUTPUT`, memory-mapped) are read twice: once column by column for the
lengths, cuts and drops (a few bytes per record), which size each split's arrays, and once in blocks of
`ROWS_PER_READ` rows whose tokens are appended to the `.npy` files. Memory stays bounded by the block,
whatever the number of tokens.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mtmoe.data.references import REFS, Reference
from mtmoe.data.shards import COUNTS
from mtmoe.data.truncate import CUTS, DROPS

ROWS_PER_READ = 4096
_ARRAYS = (("ids", np.int32), ("mask", np.uint8))


class _NpyAppender:
    """A 1-D `.npy` file of known length, written block by block.

    Plain writes, not a memory map, so the pages written do not stay in this process's resident memory.
    """

    def __init__(self, path: Path, dtype: type, n: int):
        self.dtype, self.n, self.written = np.dtype(dtype), n, 0
        self.file = open(path, "wb")  # noqa: SIM115 (closed by `close`)
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (n,)}
        np.lib.format.write_array_header_1_0(self.file, header)

    def append(self, block: np.ndarray) -> None:
        block.astype(self.dtype, copy=False).tofile(self.file)
        self.written += len(block)

    def close(self) -> None:
        self.file.close()
        assert self.written == self.n, f"{self.file.name}: wrote {self.written} of {self.n} elements"


def _flat(column: pa.ChunkedArray, idx: np.ndarray) -> np.ndarray:
    return pc.list_flatten(column.take(pa.array(idx))).to_numpy(zero_copy_only=False)


def _counts(
    sel_N: np.ndarray, kept_N: np.ndarray, lengths_N: np.ndarray, cuts_N: np.ndarray, drop_N: np.ndarray
) -> dict[str, int]:
    """A split's `COUNTS` but `loss_tokens`: `sel_N` marks its records, `kept_N` its kept samples."""
    counts = dict.fromkeys(COUNTS, 0)
    counts |= {
        "records": int(sel_N.sum()),
        "samples": int(kept_N.sum()),
        "tokens": int(lengths_N[kept_N].sum()),
    }
    counts["truncated"] = int((kept_N & (cuts_N != 0)).sum())
    counts |= {cut: int((kept_N & (cuts_N & (1 << i) != 0)).sum()) for i, cut in enumerate(CUTS)}
    counts |= {drop: int((sel_N & (drop_N == i)).sum()) for i, drop in enumerate(DROPS)}
    return counts


def write_shards(
    rows: datasets.Dataset, sides_N: np.ndarray, root: Path, splits: Sequence[str], refs_split: str | None
) -> tuple[dict[str, dict[str, int]], list[Reference]]:
    """Writes `root/<split>/{ids,mask,offsets}.npy` for every split, and the references of one.

    Args:
        rows: A task's tokenized rows, in source order.
        sides_N: Each row's split, an index into `splits`.
        root: The task's output folder.
        splits: The split names, in code order.
        refs_split: The split whose references go to `refs.jsonl` (a task with a metric), or None.

    Returns:
        The counts per split (`COUNTS`), and the references written, in sample order.
    """
    table = rows.data
    assert rows._indices is None, "the tokenized rows are a fresh Arrow file"
    lengths_N = pc.list_value_length(table.column("ids")).to_numpy(zero_copy_only=False).astype(np.int64)
    cuts_N = table.column("cuts").to_numpy()
    drop_N = table.column("drop").to_numpy()
    counts, files, kept, refs = {}, {}, {}, []
    with contextlib.ExitStack() as stack:
        for code, split in enumerate(splits):
            folder = root / split
            folder.mkdir(parents=True)
            sel_N = sides_N == code
            kept[split] = sel_N & (drop_N < 0)
            counts[split] = _counts(sel_N, kept[split], lengths_N, cuts_N, drop_N)
            np.save(
                folder / "offsets.npy",
                np.concatenate([[0], np.cumsum(lengths_N[kept[split]])]).astype(np.int64),
            )
            n = counts[split]["tokens"]
            files[split] = [_NpyAppender(folder / f"{name}.npy", dtype, n) for name, dtype in _ARRAYS]
            for f in files[split]:
                stack.callback(f.close)
        ref_file = (
            stack.enter_context(open(root / refs_split / REFS, "w", encoding="utf-8")) if refs_split else None
        )
        start = 0
        for batch in rows.with_format("arrow").iter(batch_size=ROWS_PER_READ):
            stop = start + batch.num_rows
            for split in splits:
                idx = np.flatnonzero(kept[split][start:stop])
                if len(idx) == 0:
                    continue
                ids, mask = files[split]
                ids.append(_flat(batch.column("ids"), idx))
                mask_T = _flat(batch.column("mask"), idx)
                mask.append(mask_T)
                counts[split]["loss_tokens"] += int(mask_T.sum())
                if split == refs_split:
                    for line in batch.column("ref").take(pa.array(idx)).to_pylist():
                        ref_file.write(line + "\n")
                        refs.append(Reference(**json.loads(line)))
            start = stop
    return counts, refs
