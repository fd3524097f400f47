"""A per-task validation stream for weighters that watch validation losses (CoBa).

Every step, each rank draws one micro-batch from the held-out shards (tasks mixed uniformly, samples
strided over ranks), and the per-task token-mean losses are summed over ranks before dividing.
"""

from __future__ import annotations

import torch

from mtmoe.balance.task_loss import task_loss_sums, task_token_counts
from mtmoe.data.collate import collate
from mtmoe.data.sampler import MixingSampler
from mtmoe.parallel.dist import all_reduce_sum


class ValidationStream:
    """One validation batch per call, with a resumable position.

    Args:
        shards: Held-out `TaskShard`s of the trained tasks.
        batch_size: Rows per rank per call.
        num_tasks: K (manifest tasks; ids index the loss vector).
        pad_id: Padding token.
        seed: Sampling seed.
        rank: This data-parallel rank.
        world: Data-parallel size.
    """

    def __init__(
        self, shards: list, batch_size: int, num_tasks: int, pad_id: int, seed: int, rank: int, world: int
    ):
        self.shards, self.batch_size, self.num_tasks, self.pad_id = shards, batch_size, num_tasks, pad_id
        self.sampler = MixingSampler([len(s) for s in shards], "uniform", 1.0, seed + 7919, rank, world)

    @torch.no_grad()
    def losses(self, module: torch.nn.Module, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Global per-task mean token loss of one batch, and which tasks it held."""
        draws = self.sampler.draw_batch(self.batch_size)
        batch = collate(
            [self.shards[d.task][d.index] for d in draws],
            [self.shards[d.task].task_id for d in draws],
            self.pad_id,
        ).to(device)
        was_training, recording = module.training, module.context.record
        module.eval()
        module.context.record = False
        loss_BS, _ = module(batch.input_ids_BS, batch.attention_mask_BS, batch.loss_mask_BS, batch.task_ids)
        module.train(was_training)
        module.context.record = recording
        local = torch.stack(
            [
                task_loss_sums(loss_BS, batch.task_ids, self.num_tasks).double().cpu(),
                task_token_counts(batch.loss_mask_BS.cpu(), batch.task_ids.cpu(), self.num_tasks),
            ]
        )
        sums, counts = all_reduce_sum(local)
        return sums / counts.clamp_min(1), counts > 0

    def state_dict(self) -> dict:
        """The stream's position."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restores the position."""
        self.sampler.load_state_dict(state)
