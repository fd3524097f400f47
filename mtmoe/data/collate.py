"""Batches of variable-length samples, right-padded.

Shape legend: B batch, S sequence (the longest sample, rounded up to `pad_multiple`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Batch:
    """A padded micro-batch.

    Attributes:
        input_ids_BS: Tokens (padding uses `pad_id`).
        attention_mask_BS: 1 for real tokens.
        loss_mask_BS: 1 for tokens that are prediction targets.
        task_ids_B: Task id of every row.
    """

    input_ids_BS: torch.Tensor
    attention_mask_BS: torch.Tensor
    loss_mask_BS: torch.Tensor
    task_ids_B: torch.Tensor

    def to(self, device: torch.device) -> Batch:
        """The batch on `device`."""
        return Batch(
            *(
                t.to(device)
                for t in (self.input_ids_BS, self.attention_mask_BS, self.loss_mask_BS, self.task_ids_B)
            )
        )

    def num_tokens(self) -> int:
        """Real (non-padding) tokens."""
        return int(self.attention_mask_BS.sum())


def collate(
    samples: list[tuple[np.ndarray, np.ndarray]], task_ids: list[int], pad_id: int, pad_multiple: int = 8
) -> Batch:
    """Right-pads (ids, loss_mask) samples into a `Batch`."""
    longest = max(len(ids) for ids, _ in samples)
    S = -(-longest // pad_multiple) * pad_multiple
    B = len(samples)
    ids_BS = torch.full((B, S), pad_id, dtype=torch.long)
    attn_BS = torch.zeros(B, S, dtype=torch.long)
    loss_BS = torch.zeros(B, S, dtype=torch.long)
    for b, (ids, mask) in enumerate(samples):
        n = len(ids)
        ids_BS[b, :n] = torch.from_numpy(np.asarray(ids, dtype=np.int64))
        attn_BS[b, :n] = 1
        loss_BS[b, :n] = torch.from_numpy(np.asarray(mask, dtype=np.int64))
    return Batch(ids_BS, attn_BS, loss_BS, torch.tensor(task_ids, dtype=torch.long))
