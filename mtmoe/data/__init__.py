"""Multitask data: sources, record formats, chat encoding, truncation, stable splits, tokenized shards.

`TaskSource` and `tokenize_tasks` load on first use: they need `datasets`, which reading shards (what a
training process does) does not.
"""

import importlib
from typing import Any

from mtmoe.data.encode import encode_messages
from mtmoe.data.formats import Example, Message, parse_record, read_task
from mtmoe.data.shards import Manifest, TaskInfo, TaskShard, load_manifest, open_shard, validation_split
from mtmoe.data.split import assign_eval, assign_splits, is_eval, record_key, split_task
from mtmoe.data.truncate import OVERFLOW_POLICIES, fit_pieces

_LAZY = {"TaskSource": "mtmoe.data.sources", "tokenize_tasks": "mtmoe.data.build"}

__all__ = [
    "OVERFLOW_POLICIES",
    "Example",
    "Manifest",
    "Message",
    "TaskInfo",
    "TaskShard",
    "TaskSource",
    "assign_eval",
    "assign_splits",
    "encode_messages",
    "fit_pieces",
    "is_eval",
    "load_manifest",
    "open_shard",
    "parse_record",
    "read_task",
    "record_key",
    "split_task",
    "tokenize_tasks",
    "validation_split",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mtmoe.data' has no attribute {name!r}")
