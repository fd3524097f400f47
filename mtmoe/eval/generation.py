"""Greedy, batched generation with the KV cache, and the per-task generation metrics built on it.

Every held-out sample is split at its first target token: the tokens before it are the prompt (they end
with the chat template's generation prompt), and the first assistant turn is the reference. Prompts are
left-padded into batches of one task, and each batch is decoded greedily until every row has produced
an end-of-turn token or the task's `max_new_tokens`.

The same code scores any model through a `StepFn`: `hf_step` for a plain HF causal LM (the base, a dense
export), `MoELM.next_token_logits` for the trained MoE. Samples are strided over ranks. With expert
parallelism each forward is a collective of the expert group, so every rank runs the same number of
batches (a rank short of rows decodes a filler row it does not keep) and the same number of decoding
steps (the ranks agree, step by step, whether any row anywhere is still running).

Shape legend: B rows, S tokens, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from mtmoe.data.references import MetricSpec, Reference
from mtmoe.model.moe_lm import decode_step
from mtmoe.parallel.dist import all_reduce_sum

# (input_ids_BS, attention_mask_BS (whole sequence so far), position_ids_BS, cache, task_ids_B)
#   -> (logits_BV at each row's last position, cache)
StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Any, torch.Tensor], tuple[torch.Tensor, Any]]
# (answers, references, spec) -> {"score": percentage, ...}
ScoreFn = Callable[[list[str], list[Reference], MetricSpec], dict[str, float]]


def hf_step(model: torch.nn.Module) -> StepFn:
    """The decoding step of a plain HF causal LM (the task ids are ignored)."""

    def step(ids_BS, attn_BS, pos_BS, cache, task_B):
        return decode_step(model, ids_BS, attn_BS, pos_BS, cache)

    return step


def prompt_of(ids: np.ndarray, mask: np.ndarray) -> tuple[list[int], list[int]]:
    """Splits a sample at its first target token: (prompt ids, reference answer ids of that turn)."""
    targets = np.flatnonzero(mask)
    first = int(targets[0])
    end = first
    while end < len(mask) and mask[end]:
        end += 1
    return ids[:first].tolist(), ids[first:end].tolist()


def _any_anywhere(flag: bool, sync: bool) -> bool:
    """True if `flag` is True on any rank (with `sync`, a collective over the process group)."""
    if not sync:
        return flag
    return bool(all_reduce_sum(torch.tensor([1.0 if flag else 0.0]))[0] > 0)


@torch.no_grad()
def greedy_generate(
    step: StepFn,
    prompts: Sequence[Sequence[int]],
    task_id: int,
    max_new_tokens: int,
    stop_ids: set[int],
    pad_id: int,
    device: torch.device | None = None,
    sync: bool = False,
) -> list[list[int]]:
    """Greedy continuations of a batch of prompts (one task), each up to its first stop token.

    Args:
        step: The model's decoding step.
        prompts: Token ids of each prompt (non-empty).
        task_id: The task of every row (routing may use it).
        max_new_tokens: Decoding steps at most.
        stop_ids: Tokens that end a row (end of turn, end of text); they are not returned.
        pad_id: Left padding of the prompts.
        device: Where to run.
        sync: Decode until no row on any rank of the process group runs (every rank must call this
            together): expert-parallel forwards are collectives.

    Returns:
        The generated ids of each row, without the stop token.
    """
    B, S = len(prompts), max(len(p) for p in prompts)
    ids_BS = torch.full((B, S), pad_id, dtype=torch.long)
    attn_BS = torch.zeros((B, S), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids_BS[b, S - len(p) :] = torch.as_tensor(list(p))
        attn_BS[b, S - len(p) :] = 1
    pos_BS = (attn_BS.cumsum(1) - 1).clamp_min(0)
    task_B = torch.full((B,), task_id, dtype=torch.long)
    ids_BS, attn_BS, pos_BS, task_B = (t.to(device) for t in (ids_BS, attn_BS, pos_BS, task_B))
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=ids_BS.device)
    out: list[list[int]] = [[] for _ in range(B)]
    done_B = torch.zeros(B, dtype=torch.bool, device=ids_BS.device)
    logits_BV, cache = step(ids_BS, attn_BS, pos_BS, None, task_B)
    last_pos_B = pos_BS[:, -1]
    for t in range(max_new_tokens):
        next_B = logits_BV.argmax(-1)
        done_B |= torch.isin(next_B, stop)
        for b in (~done_B).nonzero(as_tuple=True)[0].tolist():
            out[b].append(int(next_B[b]))
        if t == max_new_tokens - 1 or not _any_anywhere(not bool(done_B.all()), sync):
            break
        next_B = torch.where(done_B, torch.full_like(next_B, pad_id), next_B)
        attn_BS = torch.cat([attn_BS, torch.ones_like(attn_BS[:, :1])], dim=1)
        last_pos_B = last_pos_B + 1
        logits_BV, cache = step(next_B[:, None], attn_BS, last_pos_B[:, None], cache, task_B)
    return out


def stop_tokens(tokenizer) -> set[int]:
    """The ids that end an answer: the tokenizer's eos (end of turn in chat models) and `<|endoftext|>`."""
    ids = {tokenizer.eos_token_id}
    for token in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return {i for i in ids if i is not None}


def _gather(items: list, world: int) -> list:
    """Every rank's `items`, concatenated in rank order (the list itself when `world` is 1)."""
    if world == 1:
        return items
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def generation_metrics(
    step: StepFn,
    tasks: Sequence[tuple[Any, list[Reference], MetricSpec]],
    score: Callable[[str], ScoreFn],
    tokenizer,
    max_samples: int = 0,
    batch_size: int = 8,
    rank: int = 0,
    world: int = 1,
    device: torch.device | None = None,
    progress: bool = False,
) -> dict[str, dict[str, Any]]:
    """Each task's metric on greedy answers to its held-out prompts.

    Args:
        step: The model's decoding step.
        tasks: (held-out `TaskShard`, its references, its `MetricSpec`) of each task with a metric.
        score: Maps a metric name to its scoring function (`mtmoe.eval.metrics.get_metric(n).score`).
        tokenizer: Decodes the answers; its stop tokens end them.
        max_samples: Score the first n samples of each task (0 = all).
        batch_size: Rows per batch.
        rank: This rank; samples are strided over ranks.
        world: Number of ranks (the whole default process group when > 1); all must call this together.
        device: Where to run.
        progress: Show a progress bar (rank 0).

    Returns:
        {task: {"metric": name, "score": percentage, ...details, "samples": n, "answers": [...]}}: the
        same on every rank; scoring runs on rank 0 and is shared.
    """
    stops, pad = stop_tokens(tokenizer), tokenizer.pad_token_id
    plan = []
    for shard, refs, spec in tasks:
        n = len(shard) if max_samples == 0 else min(max_samples, len(shard))
        plan.append((shard, refs[:n], spec, n, math.ceil(math.ceil(n / world) / batch_size)))
    bar = tqdm(total=sum(p[4] for p in plan), desc="generate", disable=not progress or rank != 0)
    results = {}
    for shard, refs, spec, n, batches in plan:
        mine = list(range(rank, n, world))
        answered: list[tuple[int, str]] = []
        for start in range(0, batches * batch_size, batch_size):
            rows = mine[start : start + batch_size]
            prompts = [prompt_of(*shard[i])[0] for i in (rows or [0])]  # a filler row keeps the step count
            generated = greedy_generate(
                step, prompts, shard.task_id, spec.max_new_tokens, stops, pad, device, sync=world > 1
            )
            kept = generated[: len(rows)]  # a filler row's answer is dropped
            answered += [
                (i, tokenizer.decode(g, skip_special_tokens=True)) for i, g in zip(rows, kept, strict=True)
            ]
            bar.set_postfix_str(shard.name)
            bar.update()
        answers = [text for _, text in sorted(_gather(answered, world))]
        scored = [score(spec.name)(answers, refs, spec) if rank == 0 else None]
        if world > 1:
            dist.broadcast_object_list(scored, src=0)
        results[shard.name] = {"metric": spec.name, **scored[0], "samples": n, "answers": answers}
    bar.close()
    return results
