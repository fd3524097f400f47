"""Getting a built MoE-LoRA model ready for DeepSpeed ZeRO-3 (`parallel.zero_stage: 3`).

ZeRO-3 partitions every parameter across the data-parallel ranks and gathers a module's parameters in
hooks around that module's forward and backward. Three things in mtmoe's model need telling:

- An MoE block reads its experts' tensors directly (the LoRA factors of a module with no forward, a
  native block's stacked expert weights), and which experts run depends on the routing, which differs
  between ranks. Each block is therefore a ZeRO-3 *leaf*: its whole subtree is gathered once when the
  block starts and released when it ends, so every rank gathers the same tensors in the same order.
- The fused loss reads the LM head's weight without calling the head (`mtmoe.model.token_loss`): the
  weight is registered as an external parameter of the wrapper, gathered for its whole forward.
- The `MoEMarker`s go: they make the engine treat the model as a DeepSpeed MoE, which it refuses under
  ZeRO-3. Expert tensors carry their placement per parameter instead (`mark_expert_params`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from mtmoe.model.moe_base import MoEBlock

Partition = Callable[[Iterable[nn.Parameter]], None]


def partitioner(ds_config: dict[str, Any]) -> Partition:
    """A function that partitions parameters across the data-parallel ranks now (ZeRO-3), in place.

    Every rank calls it with the same parameters in the same order (each is broadcast from rank 0 of its
    group, then cut). A parameter keeps its identity: modules and tied weights still hold it, and its
    `data` is empty until a forward gathers it.
    """

    def partition(params: Iterable[nn.Parameter]) -> None:
        import deepspeed

        holder = nn.Module()
        for i, p in enumerate(params):
            holder.register_parameter(f"p{i}", p)
        deepspeed.zero.Init(module=holder, config_dict_or_path=ds_config)

    return partition


def partition_range(p: nn.Parameter) -> tuple[int, int, int]:
    """This rank's ZeRO-3 partition of `p`: (start, stop) in the flattened tensor, and its size.

    ZeRO pads the last rank's partition with zeros past `stop`.
    """
    size = p.ds_tensor.numel()
    start = min(size * torch.distributed.get_rank(group=p.ds_process_group), p.ds_numel)
    return start, min(start + size, p.ds_numel), size


def partitioned_from(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    read: Callable[[int, int], torch.Tensor],
    partition: Partition,
    requires_grad: bool = False,
) -> nn.Parameter:
    """A parameter partitioned across the ranks, whose local part alone is read (`read(start, stop)`).

    `read` gives elements [start, stop) of the flattened tensor. The rank's part is the range ZeRO-3
    gives it (`ds_tensor`), zero-padded at the end as ZeRO pads it. The whole tensor is allocated for a
    moment (zero.Init partitions a tensor it is given, broadcasting it from the group's first rank), but
    never read: what comes from disk is the rank's part.
    """
    param = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=requires_grad)
    partition([param])
    if getattr(param, "ds_persist", False):  # kept whole on every rank as well (persistence threshold)
        with torch.no_grad():
            param.data.copy_(read(0, param.ds_numel).view(shape))
    start, stop, _ = partition_range(param)
    with torch.no_grad():
        param.ds_tensor.data.zero_()
        if stop > start:
            param.ds_tensor.data[: stop - start].copy_(read(start, stop).reshape(-1))
    return param


@contextlib.contextmanager
def gathered(module: nn.Module) -> Iterator[None]:
    """`module`'s parameters whole for the block (read only), if ZeRO-3 partitioned them.

    For the injection of a MoEfied or native block, which reads the FFN it replaces: one FFN at a time
    is whole on a rank, never the model.
    """
    params = list(module.parameters())
    if not any(hasattr(p, "ds_id") for p in params):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params):
        yield


def prepare_for_zero3(model: nn.Module) -> list[nn.Module]:
    """Marks the MoE blocks as ZeRO-3 leaf modules, registers the LM head, and drops the MoE markers.

    Call it on the built `MoELM`, before the engine partitions the model.

    Returns:
        The MoE blocks made leaves (none for the plain-LoRA family).
    """
    from deepspeed.runtime.zero import register_external_parameter
    from deepspeed.utils import set_z3_leaf_modules

    for m in model.modules():
        if "ds_moe_marker" in m._modules:
            del m.ds_moe_marker
    head = model.lm.get_output_embeddings()
    register_external_parameter(model, head.weight)
    blocks = [m for m in model.modules() if isinstance(m, MoEBlock)]
    if not blocks:
        return []
    for block in blocks:
        block.register_forward_pre_hook(_input_needs_grad)
    return set_z3_leaf_modules(model, [MoEBlock])


def _input_needs_grad(module: nn.Module, args: tuple) -> tuple | None:
    """Makes a leaf block's input require grad (a forward pre-hook), when it does not already.

    ZeRO-3 reduces a leaf's gradients in a full backward hook, which runs once the gradients of the
    block's inputs are ready. A block whose input needs no gradient (the first MoE block of a model
    with nothing trainable before it) would have it run before its parameters' gradients exist, and
    ZeRO would reduce zeros. The cost: that one block's input gradient, computed and dropped.
    """
    x = args[0]
    if torch.is_grad_enabled() and isinstance(x, torch.Tensor) and not x.requires_grad:
        return (x.detach().requires_grad_(), *args[1:])
    return None
