"""Tasks read through `datasets`: every input kind gives the JSONL path's shards; column mapping, system
templates, rows and splits; the fingerprint cache; `num_proc`; bad input named by its row or column."""

import json
import random
import shutil

import datasets
import numpy as np
import pytest

from mtmoe.data.build import tokenize_tasks
from mtmoe.data.shards import load_manifest, open_shard
from mtmoe.data.sources import TaskSource
from mtmoe.model.base import ensure_smollm2, load_tokenizer

RECORDS = [{"prompt": f"Translate into German:\nword {i}", "answer": f"Wort {i}"} for i in range(30)]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ensure_smollm2())


def tokenize(tok, tasks, out, **kwargs):
    settings = dict(max_len=64, overflow="truncate", eval_fraction=0.3, max_eval=None)
    return tokenize_tasks(tasks, tok, "tok", out=out, log=lambda _: None, **settings | kwargs)


def shard_lists(manifest, name):
    """Every split's samples as token lists."""
    result = {}
    for split in manifest.task(name).splits:
        shard = open_shard(manifest, name, split)
        result[split] = [(shard[i][0].tolist(), shard[i][1].tolist()) for i in range(len(shard))]
    return result


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def input_kinds(root):
    """The same records in every kind of input."""
    ds = datasets.Dataset.from_list(RECORDS)
    (root / "parquet_dir").mkdir()
    ds.select(range(15)).to_parquet(root / "parquet_dir" / "a.parquet")
    ds.select(range(15, 30)).to_parquet(root / "parquet_dir" / "b.parquet")
    ds.save_to_disk(root / "saved")
    datasets.DatasetDict({"train": ds, "test": ds.select(range(3))}).save_to_disk(root / "saved_dict")
    arrow = next((root / "saved").glob("*.arrow"))
    shutil.copy(arrow, root / "rows.arrow")
    ds.to_parquet(root / "rows.parquet")
    ds.to_csv(root / "rows.csv", index=False)
    ds.to_json(root / "rows.json")  # JSON lines
    return {
        "parquet": root / "rows.parquet",
        "parquet_folder": root / "parquet_dir",
        "csv": root / "rows.csv",
        "json": root / "rows.json",
        "arrow": root / "rows.arrow",
        "saved": root / "saved",
        "saved_dict": TaskSource(path=str(root / "saved_dict"), split="train"),
    }


def test_every_input_kind_gives_the_jsonl_shards(tok, tmp_path):
    jsonl = write_jsonl(tmp_path / "rows.jsonl", RECORDS)
    expected = shard_lists(tokenize(tok, {"t": jsonl}, tmp_path / "jsonl_out"), "t")
    assert len(expected["eval"]) > 0 and len(expected["train"]) > 0
    for kind, source in input_kinds(tmp_path).items():
        manifest = tokenize(tok, {"t": source}, tmp_path / f"{kind}_out")
        assert shard_lists(manifest, "t") == expected, kind


def test_column_mapping_system_template_rows_and_source_split(tok, tmp_path):
    rows = [
        {"question": f"What is {i} + {i}?", "label": str(2 * i), "subject": "sums", "answer": i}
        for i in range(20)
    ]
    datasets.DatasetDict(
        {"test": datasets.Dataset.from_list(rows), "dev": datasets.Dataset.from_list(rows[:2])}
    ).save_to_disk(tmp_path / "qa")
    source = TaskSource(
        path=str(tmp_path / "qa"),
        split="test",
        rows=(5, 15),
        columns={"prompt": "question", "answer": "label"},
        system="You answer {subject} with a number.",
    )
    manifest = tokenize(tok, {"qa": source}, tmp_path / "out", eval_fraction=0.0)
    info = manifest.task("qa")
    assert info.splits["train"]["samples"] == 10 and info.source == str(tmp_path / "qa")
    assert info.source_options == {"split": "test", "rows": (5, 15), "system": source.system,
                                   "columns": {"prompt": "question", "answer": "label"}}  # fmt: skip
    assert load_manifest(tmp_path / "out").task("qa").source_options["rows"] == [5, 15]
    ids, mask = open_shard(manifest, "qa", "train")[0]
    text = tok.decode(ids)
    assert "You answer sums with a number." in text and "What is 5 + 5?" in text
    assert tok.decode(ids[mask.astype(bool)]) == "10<|im_end|>"


@pytest.mark.timeout(60)  # a hang fails here instead of blocking the suite
def test_a_hub_dataset_offline_fails_fast_and_clearly(tok, tmp_path):
    assert datasets.config.HF_HUB_OFFLINE  # the tests run offline (conftest)
    with pytest.raises(ValueError, match=r"hf:someone/nothing-here: .*(offline|reach)"):
        tokenize(tok, {"t": "hf:someone/nothing-here"}, tmp_path / "out", cache_dir=tmp_path / "cache")


@pytest.mark.timeout(60)  # a hang fails here instead of blocking the suite
def test_a_hub_that_cannot_be_reached_fails_fast_when_not_offline(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(ValueError, match=r"hf:someone/data: cannot reach the hub at http://127.0.0.1:9"):
        tokenize(tok, {"t": "hf:someone/data"}, tmp_path / "out")


def test_bad_input_is_named(tok, tmp_path):
    rows = [{"question": "q", "label": 1, "text": "t"}, {"question": "", "label": 2, "text": "u"}]
    datasets.Dataset.from_list(rows).to_parquet(tmp_path / "rows.parquet")
    path = str(tmp_path / "rows.parquet")
    qa = lambda answer: {"prompt": "question", "answer": answer}  # noqa: E731
    cases = [
        (TaskSource(path=path, columns=qa("nope")), r"unknown column\(s\) \['nope'\]"),
        (TaskSource(path=path, columns=qa("label")), r"column 'label' holds .*int64"),
        (TaskSource(path=path, columns=qa("text")), r"rows\.parquet row 1: prompt is empty"),
        (TaskSource(path=path, split="test"), r"no split 'test'"),
        (TaskSource(path=path, rows=(5, 9), columns=qa("text")), "empty task"),
        (TaskSource(path=path, rows=(-1, 1), columns=qa("text")), "the start must be >= 0"),
        (TaskSource(path=path, system="{missing}", columns=qa("text")), "'missing'"),
        (TaskSource(path=str(tmp_path / "none.parquet")), "no such task file or folder"),
    ]
    for source, message in cases:
        with pytest.raises(ValueError, match=message):
            tokenize(tok, {"t": source}, tmp_path / "out")
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "saved")
    with pytest.raises(ValueError, match=r"unknown record schema"):
        tokenize(tok, {"t": tmp_path / "saved"}, tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty task"):
        tokenize(tok, {"t": empty}, tmp_path / "out")
    (empty / "a.csv").write_text("prompt,answer\np,a\n")
    (empty / "b.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match="mixes file kinds"):
        tokenize(tok, {"t": empty}, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_second_run_reads_the_cache_and_a_changed_file_does_not(tok, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", RECORDS)
    logs = []

    def run(out, max_len=64):
        return tokenize_tasks({"t": path}, tok, "tok", max_len, "truncate", 0.3, None, tmp_path / out,
                              log=logs.append, cache_dir=tmp_path / "cache")  # fmt: skip

    first = run("a")
    second = run("b")
    assert "from the cache" not in logs[0] and "from the cache" in logs[1]
    assert shard_lists(first, "t") == shard_lists(second, "t")
    run("c", max_len=32)  # other settings: tokenized again
    assert "from the cache" not in logs[2]
    write_jsonl(path, RECORDS[:10])
    changed = run("d")
    assert "from the cache" not in logs[3] and changed.task("t").splits["train"]["records"] < 10


def test_two_processes_give_the_same_shards(tok, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", RECORDS)
    one = tokenize(tok, {"t": path}, tmp_path / "one")
    two = tokenize(tok, {"t": path}, tmp_path / "two", num_proc=2)
    assert shard_lists(one, "t") == shard_lists(two, "t")
    assert load_manifest(tmp_path / "two").task("t").splits == one.task("t").splits


def test_a_bad_row_in_a_worker_is_named(tok, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [*RECORDS, {"foo": 1}])
    with pytest.raises(ValueError, match=rf"{path}:31: unknown record schema"):
        tokenize(tok, {"t": path}, tmp_path / "out", num_proc=2)


def test_the_split_streams_through_block_boundaries(tok, tmp_path, monkeypatch):
    import mtmoe.data.shard_writer as writer

    path = write_jsonl(tmp_path / "t.jsonl", RECORDS)
    whole = shard_lists(tokenize(tok, {"t": path}, tmp_path / "whole"), "t")
    monkeypatch.setattr(writer, "ROWS_PER_READ", 7)
    blocks = tokenize(tok, {"t": path}, tmp_path / "blocks")
    assert shard_lists(blocks, "t") == whole
    ids = np.load(tmp_path / "blocks" / "t" / "train" / "ids.npy", mmap_mode="r")
    assert ids.dtype == np.int32


def test_the_script_takes_the_source_options(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("tokenize_script", "data_prep/tokenize_tasks.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rows = [{"question": f"What is {i} + {i}?", "label": str(2 * i), "subject": "sums"} for i in range(40)]
    datasets.Dataset.from_list(rows).to_parquet(tmp_path / "qa.parquet")
    out = tmp_path / "out"
    argv = ["--task", f"qa={tmp_path / 'qa.parquet'}", "--tokenizer", str(ensure_smollm2()),
            "--rows", "qa=0:30", "--columns", "qa=prompt=question,answer=label",
            "--system", "qa=About {subject}.", "--eval-fraction", "0.2", "--valid-fraction", "0.2",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]  # fmt: skip
    script.main(argv)
    info = load_manifest(out).task("qa")
    assert sum(c["records"] for c in info.splits.values()) == 30 and info.splits["valid"]["samples"] > 0
    assert info.source_options["columns"] == {"prompt": "question", "answer": "label"}
    script.main(argv)
    assert "tokens from the cache" in capsys.readouterr().out
    for bad, message in [
        (["--columns", "other=prompt=question"], "--columns: unknown task"),
        (["--rows", "qa=5:2"], "--rows qa=5:2: expected"),
        (["--columns", "qa=prompt"], "expected NAME=COLUMN"),
        (["--system", "qa=a", "--system", "qa=b"], "--system: task"),
    ]:
        with pytest.raises(SystemExit):
            script.main([*argv[:4], *bad, "--out", str(tmp_path / "x")])
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("parts", [1, 2, 3, 7, 50])
def test_jsonl_read_in_byte_ranges_keeps_every_line_and_its_number(tmp_path, parts):
    """`--num-proc` reads a JSONL file in byte ranges cut at line ends: the same non-blank lines, in order,
    each named by its own line number, with blank lines and a missing final newline."""
    from mtmoe.data.sources import _jsonl_lines, jsonl_chunks

    rng = random.Random(parts)
    records = [json.dumps({"i": i, "pad": "x" * rng.randint(0, 90)}) for i in range(400)]
    lines = [rng.choice(["", "  ", record, record]) for record in records]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines))  # no final newline
    want = [(f"{path}:{n}", line.encode()) for n, line in enumerate(lines, 1) if line.strip()]
    chunks = jsonl_chunks([path], parts, block=97)
    got = [(r["where"], r["line"].rstrip(b"\n")) for r in _jsonl_lines(chunks)]
    assert got == want
    assert chunks[0][1] == 0 and chunks[-1][2] == path.stat().st_size
    assert all(a[2] == b[1] for a, b in zip(chunks, chunks[1:], strict=False))  # contiguous ranges
