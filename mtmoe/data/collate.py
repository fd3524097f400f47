"""Micro-batches of variable-length samples: right-padded rows, or packed rows.

Shape legend: B batch (rows), S sequence (the longest row, rounded up to `pad_multiple`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Batch:
    """A micro-batch of rows.

    Attributes:
        input_ids_BS: Tokens (padding uses `pad_id`).
        attention_mask_BS: 1 for real tokens.
        loss_mask_BS: 1 for tokens that are prediction targets.
        task_ids: Task id of every row, (B,); or of every token, (B, S), when rows are packed.
        position_ids_BS: Set for packed rows only: positions restart at 0 with every sample, which is
            also how the model sees where a sample starts (it attends only within its sample).
    """

    input_ids_BS: torch.Tensor
    attention_mask_BS: torch.Tensor
    loss_mask_BS: torch.Tensor
    task_ids: torch.Tensor
    position_ids_BS: torch.Tensor | None = None

    @property
    def packed(self) -> bool:
        """Whether rows hold several samples."""
        return self.position_ids_BS is not None

    def to(self, device: torch.device) -> Batch:
        """The batch on `device`."""
        pos = None if self.position_ids_BS is None else self.position_ids_BS.to(device)
        return Batch(
            *(
                t.to(device)
                for t in (self.input_ids_BS, self.attention_mask_BS, self.loss_mask_BS, self.task_ids)
            ),
            position_ids_BS=pos,
        )

    def num_tokens(self) -> int:
        """Real (non-padding) tokens."""
        return int(self.attention_mask_BS.sum())


def collate(
    samples: list[tuple[np.ndarray, np.ndarray]], task_ids: list[int], pad_id: int, pad_multiple: int = 8
) -> Batch:
    """Right-pads (ids, loss_mask) samples into a `Batch`, one sample per row."""
    longest = max(len(ids) for ids, _ in samples)
    ids_BS, attn_BS, loss_BS = _empty_rows(len(samples), _round_up(longest, pad_multiple), pad_id)
    for b, (ids, mask) in enumerate(samples):
        n = len(ids)
        ids_BS[b, :n] = torch.from_numpy(np.asarray(ids, dtype=np.int64))
        attn_BS[b, :n] = 1
        loss_BS[b, :n] = torch.from_numpy(np.asarray(mask, dtype=np.int64))
    return Batch(ids_BS, attn_BS, loss_BS, torch.tensor(task_ids, dtype=torch.long))


def pack(
    samples: list[tuple[np.ndarray, np.ndarray]],
    task_ids: list[int],
    pad_id: int,
    row_length: int = 0,
    pad_multiple: int = 8,
) -> Batch:
    """Packs (ids, loss_mask) samples into as few rows as first-fit decreasing finds.

    Every sample keeps its own positions (from 0), its task on each of its tokens, and its loss mask,
    except that its first token is never a target (the token before it belongs to another sample).

    Args:
        samples: The micro-batch's samples.
        task_ids: The task of each sample.
        pad_id: Token of the padding at the end of a row.
        row_length: Tokens per row; 0 means the longest sample's length, so packed rows are no longer
            than the rows `collate` would make. A longer sample gets a row of its own.
        pad_multiple: Rows are padded to a multiple of this.

    Returns:
        A packed `Batch` (per-token `task_ids` and `position_ids_BS`).
    """
    lengths = [len(ids) for ids, _ in samples]
    rows = first_fit_decreasing(lengths, max(row_length, max(lengths)))
    S = _round_up(max(sum(lengths[i] for i in row) for row in rows), pad_multiple)
    ids_BS, attn_BS, loss_BS = _empty_rows(len(rows), S, pad_id)
    task_BS = torch.zeros(len(rows), S, dtype=torch.long)
    pos_BS = torch.zeros(len(rows), S, dtype=torch.long)
    for b, row in enumerate(rows):
        start = 0
        for i in row:
            ids, mask = samples[i]
            end = start + len(ids)
            ids_BS[b, start:end] = torch.from_numpy(np.asarray(ids, dtype=np.int64))
            attn_BS[b, start:end] = 1
            loss_BS[b, start:end] = torch.from_numpy(np.asarray(mask, dtype=np.int64))
            loss_BS[b, start] = 0
            task_BS[b, start:end] = task_ids[i]
            pos_BS[b, start:end] = torch.arange(len(ids))
            start = end
        # The padding tail is a segment of its own (positions from 0), so no sample attends to it.
        pos_BS[b, start:] = torch.arange(S - start)
    return Batch(ids_BS, attn_BS, loss_BS, task_BS, position_ids_BS=pos_BS)


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of sample indices whose lengths sum to at most `capacity` (longest samples placed first).

    Within a bin, samples keep their original order, so packing is deterministic.
    """
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return [sorted(b) for b in bins]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _empty_rows(B: int, S: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids_BS = torch.full((B, S), pad_id, dtype=torch.long)
    return ids_BS, torch.zeros(B, S, dtype=torch.long), torch.zeros(B, S, dtype=torch.long)
