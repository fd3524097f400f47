"""Held-out evaluation: the mean token loss of each task, sharded over ranks and summed exactly.

Works with any loss function, so the same code scores the base model, the MoE and the dense export.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from tqdm import tqdm

from mtmoe.data.collate import collate
from mtmoe.model.token_loss import target_mask, target_token_losses
from mtmoe.parallel.dist import all_reduce_sum

# (input_ids_BS, attention_mask_BS, loss_mask_BS, task_ids) -> loss_BS
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def hf_loss_fn(model: torch.nn.Module) -> LossFn:
    """Per-target-token losses of any HF causal LM (base or exported), computed like the trainer's."""

    def loss_fn(ids_BS, attn_BS, loss_mask_BS, task_B):
        hidden_BSD = model.base_model(input_ids=ids_BS, attention_mask=attn_BS, use_cache=False)[0]
        return target_token_losses(hidden_BSD, model.get_output_embeddings(), ids_BS, loss_mask_BS)

    return loss_fn


@torch.no_grad()
def heldout_losses(
    loss_fn: LossFn,
    shards: list,
    pad_id: int,
    batch_size: int = 8,
    max_samples: int = 0,
    rank: int = 0,
    world: int = 1,
    device: torch.device | None = None,
    progress: str | None = None,
) -> dict[str, dict[str, float]]:
    """Mean token loss per task over its held-out shard.

    Args:
        loss_fn: Maps (input_ids_BS, attention_mask_BS, loss_mask_BS, task_ids) to loss_BS.
        shards: One `TaskShard` per task (its `task_id` is what the model sees).
        pad_id: Padding token.
        batch_size: Rows per forward.
        max_samples: Use the first n samples of each shard (0 = all).
        rank: This rank; samples are strided over ranks.
        world: Number of ranks (all must call this together). Every rank runs the same number of
            forwards (a rank short of rows scores a filler row it does not count), since an
            expert-parallel forward is a collective of its group.
        device: Where to run.
        progress: The label of a progress bar (rank 0), or None for none.

    Returns:
        {task: {"loss": mean token loss, "tokens": target tokens}}.
    """
    sums = torch.zeros(len(shards), 2, dtype=torch.float64)
    counts = [len(s) if max_samples == 0 else min(max_samples, len(s)) for s in shards]
    forwards = [math.ceil(math.ceil(n / world) / batch_size) for n in counts]  # the same on every rank
    bar = tqdm(total=sum(forwards), desc=progress, disable=progress is None or rank != 0)
    for k, shard in enumerate(shards):
        mine = list(range(rank, counts[k], world))
        bar.set_postfix_str(shard.name)
        for start in range(0, forwards[k] * batch_size, batch_size):
            rows = mine[start : start + batch_size]
            filler = not rows
            rows = rows or [0]
            batch = collate([shard[i] for i in rows], [shard.task_id] * len(rows), pad_id)
            if device is not None:
                batch = batch.to(device)
            loss_BS = loss_fn(batch.input_ids_BS, batch.attention_mask_BS, batch.loss_mask_BS, batch.task_ids)
            if not filler:
                sums[k, 0] += loss_BS.sum().double().cpu()
                sums[k, 1] += target_mask(batch.loss_mask_BS).sum().double().cpu()
            bar.update()
    bar.close()
    sums = all_reduce_sum(sums)
    return {
        shard.name: {"loss": float(sums[k, 0] / sums[k, 1].clamp_min(1)), "tokens": int(sums[k, 1])}
        for k, shard in enumerate(shards)
    }
