"""Multitask data: sources, record formats, chat encoding, truncation, stable splits, tokenized shards."""

from mtmoe.data.encode import encode_messages
from mtmoe.data.formats import Example, Message, parse_record, read_task
from mtmoe.data.shards import (
    Manifest,
    TaskInfo,
    TaskShard,
    load_manifest,
    open_shard,
    tokenize_tasks,
    validation_split,
)
from mtmoe.data.sources import TaskSource
from mtmoe.data.split import assign_eval, assign_splits, is_eval, record_key, split_task
from mtmoe.data.truncate import OVERFLOW_POLICIES, fit_pieces

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
