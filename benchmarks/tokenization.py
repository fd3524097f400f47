"""Tokenizing real multitask data: records per second and peak memory, the pre-#20 path against `datasets`.

Records: the demo tasks' JSONL (the `source` of each task in a tokenized manifest, `--data`, default the
demo's), cycled to N records in all (each task keeps its share), every copy varied by a `copy` field so
its split hash differs. They are written once per size to a temporary folder. Each variant then runs in a
fresh process of its own, so its peak memory is its own: the summed anonymous RSS of the process and its
tokenizing workers (`Pss_Anon`, sampled every 250 ms from `/proc`: pages shared after a fork count once,
and file pages of the memory-mapped Arrow files not at all), and `ru_maxrss`:

- `legacy`: the path before issue #20, restated: every record read into memory (`split_task`), encoded
  one by one (`encode_messages`), cut from the right, the arrays concatenated and saved;
- `datasets_1`, `datasets_2`: `tokenize_tasks` with 1 and 2 tokenizing processes (`num_proc`), cold cache;
- `cached`: `tokenize_tasks` again on `datasets_1`'s cache (the fingerprint hit).

`--max-len` is large enough that no demo sample is cut, so every variant keeps the same tokens; the
script checks that `datasets_1` and `datasets_2` write byte-identical shards and that `legacy` counts the
same tokens. Wall-clock time (`time.perf_counter`: the 2-process variant spends its time in other
processes), one run per variant and size, sizes in increasing order. Memory is compared across sizes: a
streamed path peaks at about the same anonymous memory whatever N, the in-memory one grows. Linux only.

Run (from the repository root, on quiet cores; needs the demo data, `make demo` writes it):
    OMP_NUM_THREADS=1 HF_DATASETS_OFFLINE=1 .venv/bin/python -m benchmarks.tokenization          # writes JSON
    OMP_NUM_THREADS=1 HF_DATASETS_OFFLINE=1 .venv/bin/python -m benchmarks.tokenization --quick  # prints only
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from datasets.utils.logging import disable_progress_bar

from benchmarks.cli import result_path, warn_unless_one_thread, write_result
from benchmarks.tables import paragraph, table
from mtmoe.data.build import tokenize_tasks
from mtmoe.data.encode import encode_messages
from mtmoe.data.split import split_task
from mtmoe.model.base import load_tokenizer, resolve_base

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data" / "demo" / "tokenized"
RESULT = Path(__file__).resolve().parent / "results" / "tokenization.json"
SIZES = (50_000, 200_000)
QUICK_SIZES = (500,)
MAX_LEN = 4096
VARIANTS = ("legacy", "datasets_1", "datasets_2", "cached")
TARGET_SPEEDUP = 1.7


def write_records(data: Path, n: int, folder: Path) -> dict[str, Path]:
    """The demo tasks cycled to `n` records in all, one JSONL per task; returns task name to file."""
    manifest = json.loads((data / "manifest.json").read_text())
    sources = {t["name"]: Path(t["source"]) for t in manifest["tasks"]}
    lines = {name: path.read_text(encoding="utf-8").splitlines() for name, path in sources.items()}
    total = sum(len(v) for v in lines.values())
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, rows in lines.items():
        share = max(1, round(n * len(rows) / total))
        with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for i, line in zip(range(share), itertools.cycle(rows), strict=False):
                record = json.loads(line)
                record["copy"] = i // len(rows)
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        files[name] = folder / f"{name}.jsonl"
    return files


def _legacy(tasks: dict[str, Path], tokenizer: Any, out: Path) -> int:
    """The pre-#20 path: all records in memory, one process, a right cut; returns the tokens kept."""
    tokens = 0
    for name, path in tasks.items():
        for split, examples in split_task(path, 0.1, 24).items():
            samples = [encode_messages(tokenizer, e.messages) for e in examples]
            samples = [(ids[:MAX_LEN], mask[:MAX_LEN]) for ids, mask in samples if any(mask[:MAX_LEN])]
            folder = out / name / split
            folder.mkdir(parents=True)
            ids = np.concatenate([np.asarray(s[0], np.int32) for s in samples]) if samples else np.zeros(0)
            mask = np.concatenate([np.asarray(s[1], np.uint8) for s in samples]) if samples else np.zeros(0)
            offsets = np.concatenate([[0], np.cumsum([len(s[0]) for s in samples])]).astype(np.int64)
            np.save(folder / "ids.npy", ids)
            np.save(folder / "mask.npy", mask)
            np.save(folder / "offsets.npy", offsets)
            tokens += len(ids)
    return tokens


def _datasets(tasks: dict[str, Path], tokenizer: Any, out: Path, num_proc: int, cache: Path) -> int:
    quiet = lambda _: None  # noqa: E731
    manifest = tokenize_tasks(tasks, tokenizer, "bench", MAX_LEN, "truncate", 0.1, 24, out, log=quiet,
                              num_proc=num_proc, cache_dir=cache)  # fmt: skip
    return sum(c["tokens"] for t in manifest.tasks for c in t.splits.values())


def _shard_digest(out: Path) -> str:
    digest = hashlib.sha1()
    for path in sorted(out.rglob("*.npy")):
        digest.update(str(path.relative_to(out)).encode() + path.read_bytes())
    return digest.hexdigest()


def _anon_kib(pid: int) -> int:
    """`Pss_Anon` of a process, in KiB (0 once it is gone).

    Its anonymous memory (heap, not file pages), with the pages it shares copy-on-write with a forked parent
    or sibling split between them, so that a sum over processes counts each page once.
    """
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss_Anon:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _tree(pid: int) -> list[int]:
    """The process and its descendants (Linux's `/proc/PID/task/PID/children`)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return [pid]
    return [pid] + [p for child in children for p in _tree(int(child))]


class AnonPeak:
    """Samples the summed `Pss_Anon` of this process and its children every `SAMPLE_S`; keeps the peak.

    `ru_maxrss` also counts the file pages a process has mapped (the memory-mapped Arrow files), which the
    kernel may drop at any time; anonymous memory is what grows when data is held in memory.
    """

    SAMPLE_S = 0.25  # a read of smaps_rollup takes about 2 ms (in the kernel, without the GIL)

    def __init__(self) -> None:
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, sum(_anon_kib(p) for p in _tree(os.getpid())))
            self._stop.wait(self.SAMPLE_S)

    def __enter__(self) -> AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def worker(variant: str, records: Path, out: Path, cache: Path) -> dict[str, Any]:
    """Runs one variant in this process; returns its time, tokens and peak memory."""
    disable_progress_bar()
    tokenizer = load_tokenizer(resolve_base("smollm2-135m-instruct"))
    tasks = {p.stem: p for p in sorted(records.glob("*.jsonl"))}
    with AnonPeak() as anon:
        start = time.perf_counter()
        if variant == "legacy":
            tokens = _legacy(tasks, tokenizer, out)
        else:
            tokens = _datasets(tasks, tokenizer, out, 2 if variant == "datasets_2" else 1, cache)
        seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "tokens": tokens,
        "peak_anon_mib": anon.peak_kib / 1024,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "children_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "shards": _shard_digest(out) if variant != "legacy" else None,
    }


def run_variant(variant: str, records: Path, out: Path, cache: Path) -> dict[str, Any]:
    """`worker` in a fresh process."""
    args = ["--worker", variant, "--records", str(records), "--work", str(out), "--cache", str(cache)]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.tokenization", *args],
        capture_output=True, text=True, env=env, check=False, cwd=REPO,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(sizes: tuple[int, ...], data: Path) -> dict[str, Any]:
    """Every variant at every size; checks that they keep the same tokens."""
    runs = []
    with tempfile.TemporaryDirectory(prefix="tokenization-") as tmp:
        for n in sizes:
            root = Path(tmp) / str(n)
            files = write_records(data, n, root / "records")
            records = sum(sum(1 for _ in open(f, encoding="utf-8")) for f in files.values())
            cache = root / "cache"
            got = {}
            for variant in VARIANTS:
                same_cache = cache / ("datasets_1" if variant == "cached" else variant)
                got[variant] = run_variant(variant, root / "records", root / f"out_{variant}", same_cache)
                got[variant]["records_per_s"] = records / got[variant]["seconds"]
            digests = {got[v]["shards"] for v in VARIANTS if v != "legacy"}
            assert len(digests) == 1, f"the datasets variants wrote different shards at n={n}"
            assert len({got[v]["tokens"] for v in VARIANTS}) == 1, f"tokens differ at n={n}: {got}"
            runs.append({"records": records, "variants": got})
            print(f"n={records}: " + ", ".join(f"{v} {got[v]['records_per_s']:.0f} rec/s" for v in VARIANTS))
    last = runs[-1]["variants"]
    return {
        "benchmark": "tokenization",
        "setup": {
            "max_len": MAX_LEN,
            "eval_fraction": 0.1,
            "max_eval": 24,
            "tokenizer": "smollm2-135m-instruct",
            "clock": "time.perf_counter (wall)",
            "sources": str(data),
        },  # fmt: skip
        "runs": runs,
        "speedup_2_over_legacy": last["datasets_2"]["records_per_s"] / last["legacy"]["records_per_s"],
        "speedup_2_over_1": last["datasets_2"]["records_per_s"] / last["datasets_1"]["records_per_s"],
        "target_speedup": TARGET_SPEEDUP,
        "cpu_count": os.cpu_count(),
    }


def render_markdown(result: dict[str, Any]) -> str:
    """The docs table of a result JSON."""
    rows = []
    for r in result["runs"]:
        for name in VARIANTS:
            v = r["variants"][name]
            rows.append([f"{r['records']:,}", name, f"{v['seconds']:.1f}", f"{v['records_per_s']:,.0f}",
                         f"{v['peak_anon_mib']:.0f}", f"{v['peak_rss_mib']:.0f}"])  # fmt: skip
    header = ["records", "variant", "s (wall)", "records/s", "peak anon. MiB (with workers)", "peak RSS MiB"]
    first, last = result["runs"][0]["variants"], result["runs"][-1]["variants"]

    def growth(key: str) -> str:
        return ", ".join(f"{v} {last[v][key] / first[v][key]:.2f}×" for v in VARIANTS)

    sizes = " → ".join(f"{r['records']:,}" for r in result["runs"])
    speedup, target = result["speedup_2_over_legacy"], result["target_speedup"]
    verdict = "meets" if speedup >= target else "falls short of"
    note = paragraph(
        f"At the largest size, 2 processes tokenize {speedup:.2f}× as many records per second as the"
        f" pre-#20 path, which {verdict} the target of {target}×, and {result['speedup_2_over_1']:.2f}× as"
        f" many as 1 process. From {sizes} records the peak anonymous memory grows:"
        f" {growth('peak_anon_mib')}; the peak RSS, which also counts the memory-mapped Arrow pages:"
        f" {growth('peak_rss_mib')}."
    )
    repeats = [
        f"{r['speedup_2_over_legacy']:.2f}× ({r['speedup_2_over_1']:.2f}× over 1 process)"
        for r in result.get("repeats", [])
    ]
    if repeats:  # whole runs repeated on other occasions: how far one run's ratios move
        note += "\n\n" + paragraph(
            f"Earlier whole runs of the same code gave, at the largest size: {'; '.join(repeats)} (each"
            " variant runs once per size, so one run's ratios carry that much noise)."
        )
    return table(header, rows, align="llrrrr") + "\n\n" + note


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help=f"sizes {QUICK_SIZES} instead of {SIZES}; prints only"
    )
    parser.add_argument(
        "--data", type=Path, default=DATA, help="a tokenized folder whose task sources are read"
    )
    parser.add_argument("--out", type=Path, default=None, help=f"JSON path (default {RESULT})")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--records", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.records, args.work, args.cache)))
        return None
    warn_unless_one_thread()
    result = run(QUICK_SIZES if args.quick else SIZES, args.data)
    result["quick"] = args.quick
    print(render_markdown(result))
    write_result(result, result_path(args.out, args.quick, RESULT))
    return result


if __name__ == "__main__":
    main()
