"""Multitask JSONL records: MFTCoder's schemas, read unchanged and normalised to chat messages.

A task is one `.jsonl` file, or a folder whose `*.jsonl` files (sorted by name) are read in turn.
Each non-blank line is one JSON object in one of these schemas:

- `chat_rounds`: `[{"role": ..., "content": ...}, ...]`, with roles system / human / user / bot /
  assistant (MFTCoder writes human and bot).
- a flat pair, with an optional `system` key: `prompt`/`answer`, `instruction`/`output` (an optional
  `input` is appended to the instruction), `input`/`output`, `question`/`answer`, `query`/`response`,
  `prompt`/`completion` or `prompt`/`response`. The first pair in this order whose keys are all
  present wins.

Other keys (`id`, `data_name`, ...) are ignored. Every error names the file and the 1-based line.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "bot": "assistant",
    "assistant": "assistant",
}
# (user key, assistant key), in matching order: `instruction` must precede `input`.
PAIR_SCHEMAS = (
    ("prompt", "answer"),
    ("instruction", "output"),
    ("input", "output"),
    ("question", "answer"),
    ("query", "response"),
    ("prompt", "completion"),
    ("prompt", "response"),
)
SCHEMA_NAMES = ("chat_rounds",) + tuple(f"{u}/{a}" for u, a in PAIR_SCHEMAS)


@dataclass(frozen=True)
class Message:
    """One chat turn with a normalised role (system, user or assistant)."""

    role: str
    content: str


@dataclass(frozen=True, kw_only=True)
class Example:
    """One record of a task, where it came from, and its messages."""

    path: Path
    line: int
    record: dict[str, Any]
    messages: list[Message]

    @property
    def where(self) -> str:
        """`path:line`, for error messages."""
        return f"{self.path}:{self.line}"


def _text(value: Any, what: str, *, required: bool) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise ValueError(f"{what} is empty")
    return value


def _chat_rounds(rounds: Any) -> list[Message]:
    if not isinstance(rounds, list):
        raise ValueError(f"chat_rounds must be a list, got {type(rounds).__name__}")
    messages = []
    for i, turn in enumerate(rounds):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise ValueError(f"chat_rounds[{i}] must be an object with 'role' and 'content'")
        raw_role = turn["role"]
        role = ROLE_ALIASES.get(raw_role.lower()) if isinstance(raw_role, str) else None
        if role is None:
            raise ValueError(
                f"chat_rounds[{i}]: unknown role {raw_role!r}; expected one of {list(ROLE_ALIASES)}"
            )
        content = _text(turn["content"], f"chat_rounds[{i}].content", required=role != "system")
        if role == "system" and not content.strip():
            continue  # an empty system turn says nothing; the template's default applies
        messages.append(Message(role, content))
    return messages


def _pair(record: dict[str, Any], user_key: str, assistant_key: str) -> list[Message]:
    prompt = _text(record[user_key], user_key, required=True)
    if user_key == "instruction" and record.get("input") not in (None, ""):
        prompt = f"{prompt}\n\n{_text(record['input'], 'input', required=False)}"
    answer = _text(record[assistant_key], assistant_key, required=True)
    messages = [Message("user", prompt), Message("assistant", answer)]
    system = record.get("system")
    if system is not None and _text(system, "system", required=False).strip():
        messages.insert(0, Message("system", system))
    return messages


def parse_record(record: Any) -> list[Message]:
    """Converts one decoded JSONL record into chat messages.

    Args:
        record: The decoded JSON value of one line.

    Returns:
        The messages, with roles normalised to system / user / assistant.

    Raises:
        ValueError: If the record is not an object, its schema is unknown, a role is unknown, a
            required content is empty, there is no assistant turn, or the conversation opens with
            an assistant turn. The message does not name the
            file; `read_task` adds it.
    """
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, got {type(record).__name__}")
    if "chat_rounds" in record:
        messages = _chat_rounds(record["chat_rounds"])
    else:
        schema = next((pair for pair in PAIR_SCHEMAS if pair[0] in record and pair[1] in record), None)
        if schema is None:
            raise ValueError(
                f"unknown record schema, keys {sorted(record)}; expected one of {list(SCHEMA_NAMES)}"
            )
        messages = _pair(record, *schema)
    if not any(m.role == "assistant" for m in messages):
        raise ValueError("the conversation has no assistant turn")
    first = next(m.role for m in messages if m.role != "system")
    if first != "user":
        raise ValueError("the first turn after the system prompt must be a user turn")
    return messages


def task_files(path: Path) -> list[Path]:
    """Lists the JSONL files of one task: the file itself, or a folder's `*.jsonl`, sorted.

    Raises:
        ValueError: If the path does not exist or a folder holds no `*.jsonl` file.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.glob("*.jsonl") if p.is_file())
        if not files:
            raise ValueError(f"{path}: empty task, the folder holds no *.jsonl file")
        return files
    raise ValueError(f"{path}: no such task file or folder")


def read_task(path: Path) -> Iterator[Example]:
    """Reads one task, yielding each record with its messages, in file and line order.

    Args:
        path: A `.jsonl` file, or a folder whose `*.jsonl` files are read in sorted order.

    Yields:
        One `Example` per non-blank line.

    Raises:
        ValueError: On a malformed line (named `file:line: ...`), or if the task has no record.
    """
    count = 0
    for file in task_files(path):
        with open(file, "rb") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)  # bytes: UTF-8 (a BOM is accepted)
                except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
                    raise ValueError(f"{file}:{line_no}: bad JSON: {e}") from None
                try:
                    messages = parse_record(record)
                except ValueError as e:
                    raise ValueError(f"{file}:{line_no}: {e}") from None
                count += 1
                yield Example(path=file, line=line_no, record=record, messages=messages)
    if count == 0:
        raise ValueError(f"{path}: empty task, no record found")
