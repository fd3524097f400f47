import json
import random
import re

import pytest

from mtmoe.data.formats import Message, parse_record, read_task
from mtmoe.data.split import assign_eval, is_eval, record_key, split_task

U, A, S = "user", "assistant", "system"


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def jsonl(path, records):
    return write_lines(path, [json.dumps(r) for r in records])


# --- every schema ----------------------------------------------------------------------------------

SCHEMAS = [
    (
        {
            "id": 7,
            "data_name": "x",
            "chat_rounds": [
                {"role": "system", "content": "be brief"},
                {"role": "human", "content": "hi", "chat_round_id": 0},
                {"role": "bot", "content": "hello"},
                {"role": "user", "content": "more"},
                {"role": "assistant", "content": "sure"},
            ],
        },
        [(S, "be brief"), (U, "hi"), (A, "hello"), (U, "more"), (A, "sure")],
    ),
    ({"prompt": "p", "answer": "a"}, [(U, "p"), (A, "a")]),
    ({"instruction": "do", "output": "done"}, [(U, "do"), (A, "done")]),
    ({"instruction": "do", "input": "this", "output": "done"}, [(U, "do\n\nthis"), (A, "done")]),
    ({"instruction": "do", "input": "", "output": "done"}, [(U, "do"), (A, "done")]),
    ({"input": "in", "output": "out"}, [(U, "in"), (A, "out")]),
    ({"question": "q", "answer": "a"}, [(U, "q"), (A, "a")]),
    ({"query": "q", "response": "r"}, [(U, "q"), (A, "r")]),
    ({"prompt": "p", "completion": "c"}, [(U, "p"), (A, "c")]),
    ({"prompt": "p", "response": "r"}, [(U, "p"), (A, "r")]),
    ({"system": "sys", "query": "q", "response": "r", "lang": "en"}, [(S, "sys"), (U, "q"), (A, "r")]),
    ({"system": "", "prompt": "p", "answer": "a"}, [(U, "p"), (A, "a")]),
    ({"chat_rounds": [{"role": "System", "content": ""}, {"role": "HUMAN", "content": "q"},
                      {"role": "Bot", "content": "a"}]}, [(U, "q"), (A, "a")]),
]  # fmt: skip


@pytest.mark.parametrize("record, expected", SCHEMAS)
def test_every_schema_parses(record, expected):
    assert parse_record(record) == [Message(role, content) for role, content in expected]


def test_read_task_yields_file_line_record_and_messages(tmp_path):
    lines = [
        "",
        json.dumps({"prompt": "p", "answer": "a"}),
        "   ",
        json.dumps({"query": "q", "response": "r"}),
    ]
    path = write_lines(tmp_path / "t.jsonl", lines)
    got = list(read_task(path))
    assert [(e.path, e.line) for e in got] == [(path, 2), (path, 4)]
    assert got[0].record == {"prompt": "p", "answer": "a"}
    assert got[1].messages == [Message(U, "q"), Message(A, "r")]
    assert got[1].where == f"{path}:4"


def test_a_folder_is_one_task_read_in_sorted_order(tmp_path):
    jsonl(tmp_path / "b.jsonl", [{"prompt": "b", "answer": "x"}])
    jsonl(tmp_path / "a.jsonl", [{"prompt": "a1", "answer": "x"}, {"prompt": "a2", "answer": "x"}])
    (tmp_path / "notes.txt").write_text("not a task file")
    got = list(read_task(tmp_path))
    assert [e.messages[0].content for e in got] == ["a1", "a2", "b"]
    assert [e.path.name for e in got] == ["a.jsonl", "a.jsonl", "b.jsonl"]


# --- errors name the file and the line ---------------------------------------------------------------

GOOD = json.dumps({"prompt": "p", "answer": "a"})
BAD_LINES = [
    ('{"prompt": "p", "answer": ', "bad JSON"),
    ("[1, 2]", "must be a JSON object"),
    (json.dumps({"foo": 1, "bar": 2}), "unknown record schema, keys ['bar', 'foo']"),
    (json.dumps({"chat_rounds": [{"role": "human", "content": "q"}, {"role": "robot", "content": "a"}]}),
     "unknown role 'robot'"),
    (json.dumps({"prompt": "  ", "answer": "a"}), "prompt is empty"),
    (json.dumps({"chat_rounds": [{"role": "human", "content": "q"}, {"role": "bot", "content": ""}]}),
     "chat_rounds[1].content is empty"),
    (json.dumps({"prompt": 3, "answer": "a"}), "prompt must be a string"),
    (json.dumps({"chat_rounds": [{"role": "human", "content": "q"}]}), "no assistant turn"),
    (json.dumps({"chat_rounds": [{"role": "bot", "content": "a"}, {"role": "human", "content": "q"}]}),
     "must be a user turn"),
    (json.dumps({"chat_rounds": {"role": "human"}}), "chat_rounds must be a list"),
]  # fmt: skip


@pytest.mark.parametrize("line, message", BAD_LINES)
def test_malformed_line_names_file_and_line(tmp_path, line, message):
    path = write_lines(tmp_path / "x.jsonl", [GOOD, "", GOOD, line, GOOD])
    with pytest.raises(ValueError) as info:
        list(read_task(path))
    assert str(info.value).startswith(f"{path}:4: ")
    assert message in str(info.value)


def test_unknown_schema_lists_the_known_ones(tmp_path):
    path = write_lines(tmp_path / "x.jsonl", [json.dumps({"foo": 1})])
    with pytest.raises(ValueError, match=r"x\.jsonl:1: unknown record schema.*chat_rounds.*prompt/answer"):
        list(read_task(path))


def test_invalid_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + b'{"prompt": "\xff", "answer": "a"}\n')
    with pytest.raises(ValueError, match="^" + re.escape(f"{path}:2: bad JSON")):
        list(read_task(path))


@pytest.mark.parametrize("content", ["", "\n\n   \n"])
def test_empty_task_file_names_the_path(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=re.escape(f"{path}: empty task")):
        list(read_task(path))


def test_empty_or_missing_task_folder_names_the_path(tmp_path):
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path}: empty task")):
        list(read_task(tmp_path))
    with pytest.raises(ValueError, match="no such task"):
        list(read_task(tmp_path / "nope.jsonl"))


# --- the stable split --------------------------------------------------------------------------------


def records(n):
    return [{"prompt": f"question {i}", "answer": f"answer {i}", "id": i} for i in range(n)]


def test_split_depends_on_the_record_not_its_position():
    recs = records(300)
    sides = {r["id"]: s for r, s in zip(recs, assign_eval([record_key(r) for r in recs], 0.2), strict=True)}
    shuffled = recs[::-1][:150] + [{"prompt": "new", "answer": "x"}]
    random.Random(0).shuffle(shuffled)
    again = assign_eval([record_key(r) for r in shuffled], 0.2)
    for r, side in zip(shuffled, again, strict=True):
        if "id" in r:
            assert side == sides[r["id"]]
            assert side == is_eval(r, 0.2)


def test_record_key_ignores_key_order_but_not_content():
    assert record_key({"a": 1, "b": "é"}) == record_key({"b": "é", "a": 1})
    assert record_key({"a": 1, "b": "é"}) != record_key({"a": 1, "b": "e"})


def test_eval_fraction_is_roughly_respected():
    flags = assign_eval([record_key(r) for r in records(1000)], 0.1)
    assert 70 <= sum(flags) <= 130
    assert not any(assign_eval([record_key(r) for r in records(100)], 0.0))
    assert all(assign_eval([record_key(r) for r in records(100)], 1.0))


def test_max_eval_keeps_the_lowest_keys_and_nests():
    keys = [record_key(r) for r in records(1000)]
    full = assign_eval(keys, 0.1)
    capped = assign_eval(keys, 0.1, max_eval=24)
    assert sum(capped) == 24
    assert all(f for f, c in zip(full, capped, strict=True) if c)  # capped eval is a subset
    eval_keys = sorted(k for k, f in zip(keys, full, strict=True) if f)
    assert {k for k, c in zip(keys, capped, strict=True) if c} == set(eval_keys[:24])
    smaller = assign_eval(keys, 0.1, max_eval=10)
    assert all(c for s, c in zip(smaller, capped, strict=True) if s)


def test_duplicates_stay_on_one_side_of_the_cap():
    keys = [5, 5, 5, 1, 9, 9]
    assert assign_eval(keys, 1.0, max_eval=2) == [False, False, False, True, False, False]
    assert assign_eval(keys, 1.0, max_eval=4) == [True, True, True, True, False, False]


@pytest.mark.parametrize("fraction, max_eval", [(-0.1, None), (1.5, None), (0.1, -1)])
def test_bad_split_settings_raise(fraction, max_eval):
    with pytest.raises(ValueError, match="eval"):
        assign_eval([1, 2], fraction, max_eval)


def test_split_task_partitions_a_task_in_file_order(tmp_path):
    recs = records(200)
    parts = split_task(jsonl(tmp_path / "t.jsonl", recs), 0.2, max_eval=10)
    assert len(parts["eval"]) == 10
    lines = [e.line for e in parts["train"] + parts["eval"]]
    assert sorted(lines) == list(range(1, 201))
    assert all(is_eval(e.record, 0.2) for e in parts["eval"])
    assert [e.line for e in parts["train"]] == sorted(e.line for e in parts["train"])
