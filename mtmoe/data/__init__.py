"""Multitask data: JSONL record formats, chat encoding, stable splits, tokenized shards."""

from mtmoe.data.encode import encode_messages
from mtmoe.data.formats import Example, Message, parse_record, read_task
from mtmoe.data.shards import Manifest, TaskInfo, TaskShard, load_manifest, open_shard, tokenize_tasks
from mtmoe.data.split import assign_eval, is_eval, record_key, split_task

__all__ = [
    "Example",
    "Manifest",
    "Message",
    "TaskInfo",
    "TaskShard",
    "assign_eval",
    "encode_messages",
    "is_eval",
    "load_manifest",
    "open_shard",
    "parse_record",
    "read_task",
    "record_key",
    "split_task",
    "tokenize_tasks",
]
