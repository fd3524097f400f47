import copy
import json

import numpy as np
import pytest

from mtmoe.data.build import tokenize_tasks
from mtmoe.data.encode import encode_messages
from mtmoe.data.formats import Message, parse_record, read_task
from mtmoe.data.shards import MANIFEST, load_manifest, open_shard
from mtmoe.data.split import assign_eval, record_key
from mtmoe.model.base import ensure_smollm2, load_tokenizer

END = "<|im_end|>"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ensure_smollm2())


def as_dicts(messages):
    return [{"role": m.role, "content": m.content} for m in messages]


CONVERSATIONS = [
    [Message("user", "Hi there"), Message("assistant", "Hello! How can I help?")],
    [
        Message("system", "You answer in French."),
        Message("user", "Good morning"),
        Message("assistant", "Bonjour"),
        Message("user", "And good night?"),
        Message("assistant", "Bonne nuit\n"),
    ],
    parse_record(
        {
            "chat_rounds": [
                {"role": "human", "content": "def f(x):\n"},
                {"role": "bot", "content": "    return x + 1\n"},
                {"role": "human", "content": "\nNow in one line"},
                {"role": "bot", "content": "  f = lambda x: x + 1  "},
                {"role": "human", "content": "thanks"},
                {"role": "bot", "content": "You're welcome <3"},
            ]
        }
    ),
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_only_assistant_content_and_end_marker_carry_loss(tok, messages):
    ids, mask = encode_messages(tok, messages)
    assert len(ids) == len(mask) and set(mask) == {0, 1}
    assert tok.decode(ids) == tok.apply_chat_template(as_dicts(messages), tokenize=False)
    # Each run of loss tokens is exactly one assistant turn: its content, then the end marker.
    runs, run = [], []
    for token, m in zip(ids, mask, strict=True):
        if m:
            run.append(token)
        elif run:
            runs.append(run)
            run = []
    runs += [run] if run else []
    expected = [m.content + END for m in messages if m.role == "assistant"]
    assert [tok.decode(r) for r in runs] == expected


def test_a_template_that_is_not_prefix_stable_is_refused(tok):
    odd = copy.deepcopy(tok)
    odd.chat_template = "{% for m in messages %}{{ m['content'] }}|{% endfor %}{{ messages | length }}"
    with pytest.raises(ValueError, match="not prefix-stable"):
        encode_messages(odd, CONVERSATIONS[0])
    odd.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        encode_messages(odd, CONVERSATIONS[0])


# --- shards ----------------------------------------------------------------------------------------


def write_task(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def small_tasks(tmp_path):
    chat = [
        {"chat_rounds": [{"role": "human", "content": f"count to {i}"}, {"role": "bot", "content": str(i)}]}
        for i in range(40)
    ]
    pairs = [{"prompt": f"Translate into German:\nword {i}", "answer": f"Wort {i}"} for i in range(60)]
    folder = tmp_path / "pairs"
    folder.mkdir()
    write_task(folder / "a.jsonl", pairs[:30])
    write_task(folder / "b.jsonl", pairs[30:])
    return {"chat": write_task(tmp_path / "chat.jsonl", chat), "pairs": folder}


def test_shards_round_trip_and_manifest_layout(tok, tmp_path, capsys):
    tasks = small_tasks(tmp_path)
    out = tmp_path / "tokens"
    manifest = tokenize_tasks(tasks, tok, "smollm2-135m-instruct", 256, "truncate", 0.25, None, out)
    assert "chat (id 0): train" in capsys.readouterr().out

    data = json.loads((out / MANIFEST).read_text())
    assert list(data) == ["version", "tokenizer", "max_len", "overflow", "eval_fraction", "max_eval",
                          "valid_fraction", "max_valid", "vocab_size", "tasks"]  # fmt: skip
    assert data["version"] == 2 and list(data["tasks"][0]["splits"]) == ["train", "eval"]  # no valid split
    assert [(t["name"], t["id"], t["source"]) for t in data["tasks"]] == [
        ("chat", 0, str(tasks["chat"])),
        ("pairs", 1, str(tasks["pairs"])),
    ]
    assert load_manifest(out) == manifest
    for name, path in tasks.items():
        examples = list(read_task(path))
        flags = assign_eval([record_key(e.record) for e in examples], 0.25)
        for split, side in (("train", False), ("eval", True)):
            chosen = [e for e, f in zip(examples, flags, strict=True) if f == side]
            expected = [encode_messages(tok, e.messages) for e in chosen]
            shard = open_shard(manifest, name, split)
            counts = manifest.task(name).splits[split]
            assert shard.task_id == manifest.task(name).id
            assert len(shard) == counts["samples"] == len(expected)
            assert counts["tokens"] == sum(shard.lengths)
            assert counts["loss_tokens"] == sum(sum(m) for _, m in expected)
            for i, (ids, mask) in enumerate(expected):
                got_ids, got_mask = shard[i]
                assert got_ids.dtype == np.int32 and got_mask.dtype == np.uint8
                assert got_ids.tolist() == ids and got_mask.tolist() == mask
            assert shard[-1][0].tolist() == expected[-1][0]
            with pytest.raises(IndexError):
                shard[len(shard)]
    assert 0 < manifest.task("pairs").splits["eval"]["samples"] < 30


def overflow_task(tmp_path):
    long = " ".join(f"w{i}" for i in range(200))
    records = [{"prompt": f"short {i}", "answer": "ok"} for i in range(3)]
    records += [{"prompt": f"short {i}", "answer": long} for i in range(2)]  # loss survives the cut
    records += [{"prompt": long, "answer": "kept"}]  # a right-hand cut removes every target token
    return {"t": write_task(tmp_path / "t.jsonl", records)}


KEEP_ANSWER = {"samples": 6, "truncated": 3, "cut_answer": 2, "cut_prompt_middle": 1, "dropped_no_target": 0}


@pytest.mark.parametrize(
    "overflow, counts",
    [
        ("truncate", KEEP_ANSWER),
        ("truncate-middle", KEEP_ANSWER),
        ("truncate-right", {"samples": 5, "truncated": 2, "cut_right": 2, "dropped_too_long": 0,
                            "dropped_no_target": 1}),
        ("drop", {"samples": 3, "truncated": 0, "dropped_too_long": 3, "dropped_no_target": 0}),
    ],
)  # fmt: skip
def test_overflow_policies_are_counted(tok, tmp_path, overflow, counts):
    manifest = tokenize_tasks(overflow_task(tmp_path), tok, "tok", 64, overflow, 0.0, None, tmp_path / "out")
    train = manifest.task("t").splits["train"]
    assert {k: train[k] for k in counts} == counts and train["records"] == 6
    shard = open_shard(manifest, "t", "train")
    assert max(shard.lengths) <= 64 and all(m.any() for _, m in (shard[i] for i in range(len(shard))))
    assert len(open_shard(manifest, "t", "eval")) == 0


def test_max_eval_caps_eval_and_rerun_replaces_output(tok, tmp_path):
    tasks = small_tasks(tmp_path)
    out = tmp_path / "tokens"
    tokenize_tasks(tasks, tok, "tok", 256, "drop", 0.5, None, out, log=lambda _: None)
    manifest = tokenize_tasks(tasks, tok, "tok", 256, "drop", 0.5, 3, out, log=lambda _: None)
    for info in manifest.tasks:
        assert info.splits["eval"]["samples"] == 3
        assert info.splits["train"]["samples"] == {"chat": 37, "pairs": 57}[info.name]
    assert load_manifest(out).max_eval == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.jsonl", "pairs", "tokens"]  # no temp left


def test_user_errors(tok, tmp_path):
    tasks = small_tasks(tmp_path)
    args = dict(tokenizer=tok, tokenizer_path="tok", max_len=64, eval_fraction=0.1, max_eval=None)
    with pytest.raises(ValueError, match="overflow must be one of"):
        tokenize_tasks(tasks, overflow="wrap", out=tmp_path / "o", **args)
    with pytest.raises(ValueError, match="task name"):
        tokenize_tasks({"../up": tasks["chat"]}, overflow="drop", out=tmp_path / "o", **args)
    keep = tmp_path / "precious"
    keep.mkdir()
    (keep / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="refusing to replace"):
        tokenize_tasks(tasks, overflow="drop", out=keep, **args)
    bad = write_task(tmp_path / "bad.jsonl", [{"prompt": "p", "answer": "a"}, {"foo": 1}])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: unknown record schema"):
        tokenize_tasks({"bad": bad}, overflow="drop", out=tmp_path / "o", **args)
    assert not (tmp_path / "o").exists()

    with pytest.raises(ValueError, match="no manifest"):
        load_manifest(tmp_path / "nowhere")
    manifest = tokenize_tasks(tasks, overflow="drop", out=tmp_path / "o", log=lambda _: None, **args)
    with pytest.raises(ValueError, match=r"unknown task 'nope'.*\['chat', 'pairs'\]"):
        manifest.task("nope")
    with pytest.raises(ValueError, match="no split 'test'"):
        open_shard(manifest, "chat", "test")
