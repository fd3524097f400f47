"""Fuzzing the data path with hypothesis: whatever a task file holds, reading and tokenizing it either
works or fails with a `ValueError` that names the file and line (or the empty task); nothing else escapes,
and every record read is either a sample or a counted drop."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtmoe.data.build import tokenize_tasks
from mtmoe.data.formats import read_task
from mtmoe.model.base import load_tokenizer, resolve_base

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,  # the same examples on every CI run
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
KEYS = ["chat_rounds", "role", "content", "prompt", "answer", "instruction", "input", "output", "system",
        "question", "query", "response", "completion", "id"]  # fmt: skip
ROLES = ["system", "human", "user", "bot", "assistant", "tool", "HUMAN", ""]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30)
    | st.sampled_from(ROLES),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYS), inner, max_size=4),
    max_leaves=12,
)  # fmt: skip
turn = st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": st.text(max_size=40)})
chat = st.fixed_dictionaries({"chat_rounds": st.lists(turn, max_size=4)})
line_bytes = st.one_of(
    st.binary(max_size=60),
    json_values.map(lambda v: json.dumps(v).encode()),
    chat.map(lambda v: json.dumps(v).encode()),
    chat.map(lambda v: json.dumps(v).encode()[: len(json.dumps(v)) // 2]),  # truncated JSON
)


def _check_read(path, lines):
    try:
        examples = list(read_task(path))
    except ValueError as e:
        message = str(e)
        assert message.startswith(f"{path}:"), message
        if "empty task" not in message:
            line = int(message[len(str(path)) + 1 :].split(":")[0])
            assert 1 <= line <= len(lines)
        return None
    assert [ex.line for ex in examples] == [i + 1 for i, b in enumerate(lines) if b.strip()]
    return examples


@FUZZ
@given(lines=st.lists(line_bytes.filter(lambda b: b"\n" not in b and b"\r" not in b), max_size=5))
def test_reading_any_file_works_or_names_file_and_line(tmp_path, lines):
    path = tmp_path / "task.jsonl"
    path.write_bytes(b"\n".join(lines))
    _check_read(path, lines)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_base("smollm2-135m-instruct"))


@settings(FUZZ, max_examples=25)
@given(records=st.lists(chat, min_size=1, max_size=4), max_len=st.integers(1, 40))
def test_tokenizing_counts_every_record(tmp_path_factory, tokenizer, records, max_len):
    root = tmp_path_factory.mktemp("fuzz")
    path = root / "task.jsonl"
    lines = [json.dumps(r).encode() for r in records]
    path.write_bytes(b"\n".join(lines))
    if _check_read(path, lines) is None:
        return  # a malformed record: named above, nothing to tokenize
    try:
        manifest = tokenize_tasks(
            {"t": path}, tokenizer, "smollm2-135m-instruct", max_len, "truncate", 0.0, None, root / "out",
            log=lambda _: None,
        )  # fmt: skip
    except ValueError as e:
        assert str(e).startswith(f"{path}:"), str(e)
        return
    counts = manifest.tasks[0].splits["train"]
    assert counts["records"] == len(records)
    assert counts["samples"] + counts["dropped_too_long"] + counts["dropped_no_target"] == len(records)


@pytest.mark.parametrize("overflow,counter", [("truncate", "truncated"), ("drop", "dropped_too_long")])
def test_a_huge_line_is_cut_or_dropped_and_counted(tmp_path, tokenizer, overflow, counter):
    path = tmp_path / "task.jsonl"
    huge = {"prompt": "hi", "answer": "word " * 100_000}  # a 500 kB line, ~100k tokens
    path.write_text(json.dumps(huge) + "\n" + json.dumps({"prompt": "hi", "answer": "hello"}) + "\n")
    manifest = tokenize_tasks(
        {"t": path}, tokenizer, "smollm2-135m-instruct", 64, overflow, 0.0, None, tmp_path / "out",
        log=lambda _: None,
    )  # fmt: skip
    counts = manifest.tasks[0].splits["train"]
    assert counts["records"] == 2 and counts[counter] == 1
    assert counts["samples"] == (2 if overflow == "truncate" else 1)
