"""Expert parallelism: experts placed by global id across DeepSpeed's expert-parallel group.

With `ep_size` P and E experts, EP rank p owns experts [p*E/P, (p+1)*E/P). A block sends each of its
token-expert assignments to the owner of the expert with one all-to-all, the owner runs its experts on
what it received, and a second all-to-all brings the results back. Before the rows move, the ranks
exchange their per-expert counts, so every rank knows exactly how many rows it sends to and receives
from every peer: uneven routing (even every token of a rank on one expert) cannot hang the exchange.

Expert parameters are marked the way DeepSpeed marks its own MoE experts (`allreduce=False`,
`group_name`), and a parameter-free `MoEMarker` makes the engine treat the model as an MoE model: it
then broadcasts and reduces expert gradients over the expert-data-parallel group, and ZeRO partitions
expert optimizer state there.

Shape legend: N assignments sorted by global expert, M received rows, C row width, E global experts,
L local experts (E/P), P expert-parallel size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

try:  # DeepSpeed's MoE base class: the engine switches on its MoE support when it finds one.
    from deepspeed.moe.layer import MoE as _DeepSpeedMoE
except ImportError:  # pragma: no cover - deepspeed is a hard dependency of training
    _DeepSpeedMoE = nn.Module


@dataclass(frozen=True)
class ExpertPlacement:
    """Which experts this rank owns, and the group that exchanges tokens.

    Attributes:
        num_experts: E, experts per block.
        ep_size: P, ranks the experts are spread over.
        ep_rank: This rank's index in its expert-parallel group.
        group: The expert-parallel process group (None when P is 1).
    """

    num_experts: int
    ep_size: int = 1
    ep_rank: int = 0
    group: Any = None

    @property
    def group_name(self) -> str:
        """DeepSpeed's name for the expert groups of this size."""
        return f"ep_size_{self.ep_size}"

    @property
    def num_local(self) -> int:
        """L, experts held by this rank."""
        return self.num_experts // self.ep_size

    @property
    def local(self) -> slice:
        """The global ids of this rank's experts."""
        return slice(self.ep_rank * self.num_local, (self.ep_rank + 1) * self.num_local)


def check_ep_size(ep_size: int, num_experts: int, world_size: int) -> None:
    """Raises a `ValueError` naming `parallel.ep_size` unless it divides the experts and the world."""
    if ep_size < 1 or num_experts % ep_size or world_size % ep_size:
        raise ValueError(
            f"config key 'parallel.ep_size'={ep_size} must divide both moe.num_experts={num_experts} "
            f"and the world size {world_size}"
        )


def create_placement(ep_size: int, num_experts: int) -> ExpertPlacement:
    """Creates (once) DeepSpeed's expert-parallel and expert-data-parallel groups of size `ep_size`.

    Every rank must call this, after `init_distributed`. With the default layout, EP groups are runs of
    consecutive ranks (the GPUs of one node), and the expert-data-parallel groups stride across them.

    Raises:
        ValueError: If `ep_size` does not divide the experts and the world size.
    """
    from deepspeed.utils import groups

    check_ep_size(ep_size, num_experts, dist.get_world_size())
    name = f"ep_size_{ep_size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    return ExpertPlacement(
        num_experts=num_experts,
        ep_size=ep_size,
        ep_rank=groups._get_expert_parallel_rank(name),
        group=groups._get_expert_parallel_group(name) if ep_size > 1 else None,
    )


class MoEMarker(_DeepSpeedMoE):
    """A parameter-free child module that makes DeepSpeed treat its parent as an MoE layer.

    DeepSpeed's engine looks for instances of its `MoE` class to decide whether expert parameters get
    their own gradient reduction and ZeRO partitioning. The marker carries only what the engine reads.

    Args:
        placement: The experts' placement.
    """

    def __init__(self, placement: ExpertPlacement):
        nn.Module.__init__(self)  # not MoE.__init__: the marker builds no gate and no experts
        self.num_experts = placement.num_experts
        self.ep_size = placement.ep_size
        self.num_local_experts = placement.num_local
        self.expert_group_name = placement.group_name

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Nothing to do: `create_placement` made the groups before the model was built."""

    def forward(self, *args, **kwargs):  # pragma: no cover - never called
        """Refuses: the marker computes nothing."""
        raise RuntimeError("MoEMarker is a marker; it has no forward")


def mark_expert_params(module: nn.Module | list[nn.Parameter], placement: ExpertPlacement) -> None:
    """Marks parameters as expert parameters of `placement`'s group, as DeepSpeed does.

    ZeRO-1/2 read `allreduce` and `group_name` (with a `MoEMarker` in the model). ZeRO-3 reads the
    per-parameter placement its AutoEP layers use: an expert tensor is partitioned (and its gradient
    reduced) over the expert-data-parallel group, never over the ranks that hold other experts, and its
    gradient is averaged over the whole world like every other. Set before ZeRO-3 converts the model.

    Args:
        module: A module (all its parameters) or a list of parameters.
        placement: The experts' placement.
    """
    from deepspeed.utils import groups

    params = module.parameters() if isinstance(module, nn.Module) else module
    # A plan's placement (or a test's) has no DeepSpeed expert groups: only `create_placement` makes them.
    edp = groups._get_expert_data_parallel_group_dict().get(placement.group_name)
    for p in params:
        p.allreduce = False
        p.group_name = placement.group_name
        if placement.ep_size > 1 and edp is not None:
            p.ds_zero_placement_family = "autoep_expert"
            p.ds_zero_partition_group_name = placement.group_name
            p.ds_zero_partition_process_group = edp


def is_expert_param(p: torch.Tensor) -> bool:
    """True for parameters marked by `mark_expert_params` (or by DeepSpeed's own MoE)."""
    return getattr(p, "allreduce", True) is False


@dataclass(frozen=True)
class ExchangePlan:
    """Row counts agreed by every rank of the group before the rows move.

    Attributes:
        send_splits: Rows this rank sends to each peer.
        recv_splits: Rows this rank receives from each peer.
        recv_counts_PL: Rows received from each peer for each local expert.
    """

    send_splits: list[int]
    recv_splits: list[int]
    recv_counts_PL: torch.Tensor


def plan_exchange(counts_E: torch.Tensor, placement: ExpertPlacement) -> ExchangePlan:
    """Exchanges per-expert counts so that every rank knows every split (a collective).

    Args:
        counts_E: Rows this rank sends to each global expert.
        placement: The experts' placement.
    """
    P, L = placement.ep_size, placement.num_local
    send_PL = counts_E.to(torch.int64).reshape(P, L).contiguous()
    recv_PL = torch.empty_like(send_PL)
    dist.all_to_all_single(recv_PL, send_PL, group=placement.group)
    return ExchangePlan(
        send_splits=send_PL.sum(1).tolist(), recv_splits=recv_PL.sum(1).tolist(), recv_counts_PL=recv_PL
    )


class _AllToAll(torch.autograd.Function):
    """Uneven all-to-all of rows; the backward sends the gradients back the way the rows came."""

    @staticmethod
    def forward(ctx, rows_NC: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out_MC = rows_NC.new_empty(sum(recv), rows_NC.shape[1])
        dist.all_to_all_single(out_MC, rows_NC.contiguous(), recv, send, group=group)
        return out_MC

    @staticmethod
    def backward(ctx, grad_MC: torch.Tensor):
        grad_NC = grad_MC.new_empty(sum(ctx.send), grad_MC.shape[1])
        dist.all_to_all_single(grad_NC, grad_MC.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        return grad_NC, None, None, None


def expert_parallel_apply(
    rows_NC: torch.Tensor,
    counts_E: torch.Tensor,
    placement: ExpertPlacement,
    local_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Runs each row on the rank that owns its expert and returns the results in the rows' order.

    Args:
        rows_NC: Rows sorted by global expert id (so each peer's rows are contiguous).
        counts_E: Rows per global expert.
        placement: The experts' placement.
        local_fn: `local_fn(rows_MC, counts_L)` runs this rank's experts on rows grouped by local expert.

    Returns:
        The results, one row per input row, differentiable with respect to `rows_NC` and to whatever
        `local_fn` uses.
    """
    P, L = placement.ep_size, placement.num_local
    plan = plan_exchange(counts_E, placement)
    recv_MC = _AllToAll.apply(rows_NC, plan.send_splits, plan.recv_splits, placement.group)
    # Received rows come peer by peer (each peer's rows by local expert); the experts need them by expert.
    seg_M = torch.repeat_interleave(
        torch.arange(P * L, device=rows_NC.device), plan.recv_counts_PL.reshape(-1).to(rows_NC.device)
    )
    by_expert_M = torch.argsort((seg_M % L) * P + seg_M // L, stable=True)
    out_MC = local_fn(recv_MC[by_expert_M], plan.recv_counts_PL.sum(0))
    back_MC = torch.empty_like(out_MC).index_copy(0, by_expert_M, out_MC)
    return _AllToAll.apply(back_MC, plan.recv_splits, plan.send_splits, placement.group)


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, placement: ExpertPlacement) -> torch.Tensor:
    """Clips the trainable gradients to a global L2 norm that counts every expert once.

    Under expert parallelism the ranks of a group hold different experts, so the norm adds the
    squared expert gradients over the expert-parallel group; dense gradients are the same on every
    rank and count once. (DeepSpeed's ZeRO-0 clipping averages per-rank norms instead, which is only
    right when every rank holds the same parameters.) Call it after the gradients are reduced.

    Returns:
        The global norm before clipping.
    """
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    expert = [
        p.grad for p in model.parameters() if p.requires_grad and p.grad is not None and is_expert_param(p)
    ]
    zero = torch.zeros((), device=grads[0].device if grads else None)
    dense_sq = sum((g.float().pow(2).sum() for g in grads), zero)
    expert_sq = sum((g.float().pow(2).sum() for g in expert), zero)
    if placement.ep_size > 1:
        dense_sq = dense_sq - expert_sq
        dist.all_reduce(expert_sq, group=placement.group)
        dense_sq = dense_sq + expert_sq
    total = dense_sq.sqrt()
    coef = max_norm / (total + 1e-6)
    if coef < 1:
        for g in grads:
            g.mul_(coef)
    return total
