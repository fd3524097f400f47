"""The valid split (CoBa and Quality Retaining watch it; the report scores eval) and manifest versions."""

import json
import sys

import numpy as np
import pytest
from conftest import run_cmd
from training_runs import records, train_run

from mtmoe.data.build import tokenize_tasks
from mtmoe.data.shards import MANIFEST, load_manifest, open_shard, validation_split
from mtmoe.data.split import SPLITS, assign_eval, assign_splits, record_key
from mtmoe.model.base import ensure_smollm2, load_tokenizer

RECORDS = [{"prompt": f"question {i}", "answer": f"answer {i}"} for i in range(300)]


def test_valid_takes_the_next_band_and_eval_does_not_move():
    keys_N = np.array([record_key(r) for r in RECORDS], dtype=np.uint64)
    sides_N = assign_splits(keys_N, 0.2, None, 0.1)
    assert [SPLITS[c] for c in np.unique(sides_N)] == ["train", "eval", "valid"]
    assert (sides_N == 1).tolist() == assign_eval(keys_N.tolist(), 0.2)  # eval as without valid
    assert 15 <= (sides_N == 2).sum() <= 45
    fraction_N = keys_N / 2.0**64
    assert np.all((fraction_N[sides_N == 2] >= 0.2) & (fraction_N[sides_N == 2] < 0.3))
    capped_N = assign_splits(keys_N, 0.2, 5, 0.1, 4)
    assert (capped_N == 1).sum() == 5 and (capped_N == 2).sum() == 4
    valid_keys = np.sort(keys_N[sides_N == 2])
    assert set(keys_N[capped_N == 2]) == set(valid_keys[:4])  # the lowest keys of the band
    with pytest.raises(ValueError, match="eval_fraction \\+ valid_fraction"):
        assign_splits(keys_N, 0.7, None, 0.4)
    with pytest.raises(ValueError, match="max_valid"):
        assign_splits(keys_N, 0.1, None, 0.1, -1)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ensure_smollm2())


def samples(manifest, name, split):
    shard = open_shard(manifest, name, split)
    return {tuple(shard[i][0].tolist()) for i in range(len(shard))}


def test_the_valid_split_is_disjoint_from_eval_and_train(tok, tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    args = (tok, "tok", 64, "truncate")
    plain = tokenize_tasks({"t": path}, *args, 0.1, None, tmp_path / "plain", log=lambda _: None)
    manifest = tokenize_tasks({"t": path}, *args, 0.1, None, tmp_path / "out", log=lambda _: None,
                              valid_fraction=0.1)  # fmt: skip
    train, eval_, valid = (samples(manifest, "t", s) for s in ("train", "eval", "valid"))
    assert valid and not valid & eval_ and not valid & train and not eval_ & train
    assert len(train) + len(eval_) + len(valid) == len(RECORDS)
    assert eval_ == samples(plain, "t", "eval")  # the report scores the same eval split
    assert load_manifest(tmp_path / "out").valid_fraction == 0.1
    assert validation_split(manifest, ["t"]) == "valid" and validation_split(plain, ["t"]) == "eval"


def test_a_version_1_manifest_still_loads_and_an_unknown_version_is_refused(tok, tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS[:20]))
    out = tmp_path / "out"
    tokenize_tasks({"t": path}, tok, "tok", 64, "truncate", 0.2, None, out, log=lambda _: None)
    data = json.loads((out / MANIFEST).read_text())
    old_counts = (
        "records",
        "samples",
        "tokens",
        "loss_tokens",
        "truncated",
        "dropped_too_long",
        "dropped_no_target",
    )
    v1 = {k: v for k, v in data.items() if k not in ("valid_fraction", "max_valid")} | {"version": 1}
    for task in v1["tasks"]:
        task["splits"] = {s: {k: c[k] for k in old_counts} for s, c in task["splits"].items()}
    (out / MANIFEST).write_text(json.dumps(v1))
    manifest = load_manifest(out)
    assert manifest.version == 1 and manifest.overflow == "truncate-right" and manifest.valid_fraction == 0.0
    assert manifest.task("t").splits["train"]["cut_answer"] == 0
    assert len(open_shard(manifest, "t", "train")) == manifest.task("t").splits["train"]["samples"]
    assert validation_split(manifest, ["t"]) == "eval"
    (out / MANIFEST).write_text(json.dumps(v1 | {"version": 99}))
    with pytest.raises(
        ValueError, match=r"version 99, this mtmoe reads versions \[1, 2\]; tokenize the tasks again"
    ):
        load_manifest(out)


def test_coba_trains_on_a_valid_split(demo_jsonl, tmp_path):
    data = tmp_path / "tokenized"
    tasks = [f"--task={t}={demo_jsonl / t}.jsonl" for t in ("docstring", "translate")]
    run_cmd([sys.executable, "data_prep/tokenize_tasks.py", *tasks, "--tokenizer", "smollm2-135m-instruct",
             "--max-len", "128", "--eval-fraction", "0.2", "--max-eval", "6", "--valid-fraction", "0.2",
             "--max-valid", "4", "--no-cache", "--out", data])  # fmt: skip
    manifest = load_manifest(data)
    assert all(t.splits["valid"]["samples"] == 4 for t in manifest.tasks)
    coba = ["balance.weighter=coba", "balance.options.warmup=1"]
    run = train_run(data, tmp_path / "run", 1, 1, *coba, steps=2, save_every=0)
    assert any(k.startswith("val_loss/") for r in records(run) for k in r)
