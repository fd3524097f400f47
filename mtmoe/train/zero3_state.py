"""A ZeRO-3 parameter's state, partition by partition, for checkpoints that do not depend on the stage.

Under ZeRO-3 a parameter's `data` is empty between uses: this rank holds its flat, padded partition
(`ds_tensor`, the model dtype) and the optimizer holds the fp32 master and AdamW moments of the same
slice. A checkpoint stores whole tensors; these helpers cut a whole tensor into this rank's partition and
put partitions back together.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from mtmoe.model.zero3 import partition_range


def is_zero3(p: torch.Tensor) -> bool:
    """True for a parameter that ZeRO-3 partitioned (its `data` is empty between uses)."""
    return hasattr(p, "ds_id")


def full_shape(p: torch.Tensor) -> tuple[int, ...]:
    """A parameter's full shape, partitioned by ZeRO-3 or not."""
    return tuple(p.ds_shape) if is_zero3(p) else tuple(p.shape)


def partition_of(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """This rank's ZeRO-3 partition of `full` (flat; the last rank's is zero-padded as ZeRO pads it)."""
    start, stop, size = partition_range(p)
    out = full.new_zeros(size)
    out[: stop - start] = full.flatten()[start:stop]
    return out


def unpartition(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The full tensor from every rank's ZeRO-3 partition `t` of `p` (a collective); others unchanged."""
    if not is_zero3(p):
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group=p.ds_process_group))]
    dist.all_gather(parts, t.contiguous(), group=p.ds_process_group)
    return torch.cat(parts)[: p.ds_numel].view(tuple(p.ds_shape))


def write_partitions(p: nn.Parameter, w: torch.Tensor, moments: dict[str, torch.Tensor]) -> None:
    """Writes a full fp32 weight and its moments into a ZeRO-3 parameter's partitions on this rank.

    Both copies of the weight: the model-dtype partition that forwards gather, and the optimizer's fp32
    master. (DeepSpeed's full-tensor setter assumes a partition that divides the tensor evenly.)
    """
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

    part = partition_of(w.float().to(p.ds_tensor.device), p)
    with torch.no_grad():
        p.ds_tensor.copy_(part.to(p.ds_tensor.dtype))
    safe_set_local_fp32_param(p, part)
    for k, m in moments.items():
        safe_set_local_optimizer_state(p, partition_of(m.float(), p), k)
