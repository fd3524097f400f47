"""What a plan is for, beyond the recipe: the job's world, sequence length and GPU."""

from __future__ import annotations

import dataclasses

GIB = 1024**3


@dataclasses.dataclass(frozen=True, kw_only=True)
class Workload:
    """What the plan is for, beyond the recipe.

    Attributes:
        world: Ranks in the job (GPUs).
        seq_len: S, tokens per sequence (the collator pads each micro-batch to its longest row).
        target_frac: Share of the positions that carry loss (1 = every position but the first).
        padded: Assume micro-batches with padding: the attention mask is materialised and, for
            upcycled blocks, padding tokens keep the frozen FFN through a second, masked path.
        gpu_mem_gib: Memory of one GPU.
        reserve_gib: Set aside for the CUDA context, NCCL and kernels' workspaces.
        frag: Share of the rest lost to allocator fragmentation.
        num_tasks: Tasks, when no task names are given (task-routing tables, counters).
    """

    world: int = 1
    seq_len: int = 2048
    target_frac: float = 1.0
    padded: bool = True
    gpu_mem_gib: float = 80.0
    reserve_gib: float = 1.5
    frag: float = 0.10
    num_tasks: int = 1

    @property
    def usable_bytes(self) -> float:
        """GPU memory a plan may fill: (gpu − reserve) · (1 − frag)."""
        return (self.gpu_mem_gib - self.reserve_gib) * (1 - self.frag) * GIB
