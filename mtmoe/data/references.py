"""What a task's held-out answers are scored against: its declared metric and one reference per sample.

A task declares its metric when it is tokenized (`MetricSpec`, kept in the manifest). The held-out
split then keeps one `Reference` per sample, as JSON lines in `<task>/eval/refs.jsonl`, in sample order.
Which metrics exist, and what each needs of a reference, is the eval layer's business
(`mtmoe.eval.metrics`); the tokenizer takes a `check` callback from it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mtmoe.data.formats import Example, Message

REFS = "refs.jsonl"


@dataclass(frozen=True, kw_only=True)
class Reference:
    """What one held-out sample's generated answer is scored against.

    Attributes:
        answer: The reference answer: the text of the record's first assistant turn (the turn whose
            prompt generation continues).
        test: HumanEval-style test code that defines `check(candidate)` (for pass@1).
        entry_point: The function `check` is called with (for pass@1).
        code_prefix: Code placed before the answer when it is tested, for prompts whose answer
            continues code (HumanEval's `prompt`); empty when the answer is a whole program.
        where: `file:line` of the record, for messages.
    """

    answer: str
    test: str | None = None
    entry_point: str | None = None
    code_prefix: str = ""
    where: str = ""


@dataclass(frozen=True, kw_only=True)
class MetricSpec:
    """A task's declared metric, as the manifest records it.

    Attributes:
        name: A metric of `mtmoe.eval.metrics.METRICS` (`pass@1`, `chrf`, `bleu`, `exact_match`,
            `accuracy`).
        max_new_tokens: Cap on generated tokens per answer; 0 when declaring means "the longest
            held-out reference answer plus 8", resolved when the task is tokenized.
        labels: The label set, for `accuracy`.
    """

    name: str
    max_new_tokens: int = 0
    labels: tuple[str, ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        """The manifest's form."""
        return {"name": self.name, "max_new_tokens": self.max_new_tokens, "labels": list(self.labels)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MetricSpec:
        """Reads the manifest's form."""
        return cls(
            name=data["name"], max_new_tokens=int(data["max_new_tokens"]), labels=tuple(data["labels"])
        )


def _optional_text(record: dict[str, Any], key: str) -> str | None:
    value = record.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"'{key}' must be a string, got {type(value).__name__}")
    return value


def reference_from(record: dict[str, Any], messages: list[Message], where: str, turn: int = -1) -> Reference:
    """The reference of one record: an assistant turn, and the record's optional test fields.

    Args:
        record: The record (its `test`, `entry_point` and `code_prefix` are read).
        messages: Its messages.
        where: Where it came from (`file:line`, or a dataset's row), for messages.
        turn: The index in `messages` of the assistant turn the held-out prompt leads to; -1 for the first.

    Raises:
        ValueError: If `test`, `entry_point` or `code_prefix` is present but not a string (the caller
            adds where).
    """
    if turn < 0:
        turn = next(i for i, m in enumerate(messages) if m.role == "assistant")
    return Reference(
        answer=messages[turn].content,
        test=_optional_text(record, "test"),
        entry_point=_optional_text(record, "entry_point"),
        code_prefix=_optional_text(record, "code_prefix") or "",
        where=where,
    )


def reference_of(example: Example) -> Reference:
    """The reference of one JSONL record: its first assistant turn, and its optional test fields.

    Raises:
        ValueError: If `test`, `entry_point` or `code_prefix` is present but not a string (the caller
            adds the file and line).
    """
    return reference_from(example.record, example.messages, example.where)


def write_references(folder: Path, refs: list[Reference]) -> None:
    """Writes `folder/refs.jsonl`, one reference per line."""
    with open(folder / REFS, "w", encoding="utf-8") as f:
        for ref in refs:
            f.write(json.dumps(asdict(ref), ensure_ascii=False) + "\n")


def read_references(folder: Path) -> list[Reference]:
    """Reads `folder/refs.jsonl`.

    Raises:
        ValueError: If the file is missing (the task was tokenized without a metric) or malformed.
    """
    path = Path(folder) / REFS
    if not path.is_file():
        raise ValueError(f"{path}: no references; tokenize the task with --metric")
    refs = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            refs.append(Reference(**json.loads(line)))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}:{line_no}: not a reference: {e}") from None
    return refs
