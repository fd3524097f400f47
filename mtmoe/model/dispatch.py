"""Local dispatch: choose the assignments that run, sort them by expert, grouped matmuls, combine.

An assignment (token t, its k-th expert e) runs unless its token is padding or expert e is past its
capacity on this rank. A dropped assignment loses its expert's LoRA delta, not the frozen FFN: its gate
weight goes to the base FFN's output (see `MoELoRAFFN`), so a padding token computes the base model.

Shape legend: T tokens, K experts per token, N kept assignments (sorted by expert), E experts,
I/O input and output widths of a grouped matmul.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class ExpertGroups:
    """Sizes of consecutive row groups, one per expert (the layout `grouped_mm` takes).

    Attributes:
        counts_E: Rows per expert.
        offsets_E: Cumulative end of each expert's group (int32, as `grouped_mm` wants).
    """

    counts_E: torch.Tensor
    offsets_E: torch.Tensor

    @classmethod
    def from_counts(cls, counts_E: torch.Tensor) -> ExpertGroups:
        """Groups with the given sizes."""
        return cls(counts_E=counts_E, offsets_E=torch.cumsum(counts_E, 0).to(torch.int32))


@dataclass
class Dispatch:
    """The kept assignments, sorted by expert.

    Attributes:
        token_N: Source token of each sorted assignment.
        weight_N: Gate weight of each sorted assignment.
        groups: Assignments per expert.
        dropped_weight_T: Per token, the gate weight of its dropped assignments (None if none dropped).
        num_routed: Assignments of real tokens.
        num_dropped: Of those, how many capacity dropped.
    """

    token_N: torch.Tensor
    weight_N: torch.Tensor
    groups: ExpertGroups
    dropped_weight_T: torch.Tensor | None = None
    num_routed: int = 0
    num_dropped: int = 0


def expert_capacity(
    capacity_factor: float, num_tokens: int, top_k: int, num_experts: int, min_capacity: int = 0
) -> int | None:
    """Assignments an expert takes per rank; None means dropless (factor 0).

    Follows DeepSpeed's gating (`deepspeed.moe.sharded_moe._capacity` with the factor times k, as its
    top1/top2/topk gating pass it): max(ceil((tokens / E) * (factor * K)), min_capacity), in DeepSpeed's
    own float32 arithmetic, so that both drop the same assignments even where the product is a whole
    number that float rounding lifts past it (e.g. factor 0.1, K 3, 100 tokens, 1 expert: 31, not 30).
    """
    if capacity_factor <= 0:
        return None
    factor = torch.tensor(capacity_factor * top_k, dtype=torch.float32)
    return max(math.ceil(((num_tokens / num_experts) * factor).item()), min_capacity)


def dispatch(
    ids_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    num_experts: int,
    valid_T: torch.Tensor | None = None,
    capacity_factor: float = 0.0,
    *,
    min_capacity: int = 0,
    priority_TK: torch.Tensor | None = None,
) -> Dispatch:
    """Keeps the assignments that run and groups them by expert, stably.

    Within an expert, first choices come before second choices, and earlier tokens before later ones.
    With a capacity, an expert keeps the assignments that DeepSpeed's gating (0.19) keeps:
    - K <= 2 (its top1/top2gating): the first ones in that order (the GShard/Switch priority). DeepSpeed's
      top-1 picks among an expert's tokens at random (RTS) or, without RTS, in `torch.topk`'s unspecified
      tie order; it keeps as many as we do, and we keep the earliest.
    - K >= 3 (its topkgating, `drop_policy="probs"`): the ones with the largest `priority_TK`, ties in
      the order above. DeepSpeed ranks by the softmax probability; pass it as `priority_TK` when
      `weights_TK` is renormalised, which changes the ranking.
    Unlike DeepSpeed, which renormalises the gates over the kept experts, a dropped assignment keeps its
    weight and reports it in `dropped_weight_T`; the capacity counts the real tokens only.

    Args:
        ids_TK: Chosen experts.
        weights_TK: Their gate weights.
        num_experts: E.
        valid_T: Bool mask of real tokens (None = all real); padding tokens are never dispatched.
        capacity_factor: 0 for dropless, else the capacity factor of `expert_capacity`.
        min_capacity: The least capacity of `expert_capacity`.
        priority_TK: For K >= 3 with a capacity, what ranks an expert's assignments (None = `weights_TK`).
    """
    T, K = ids_TK.shape
    device = ids_TK.device
    ids_N = ids_TK.t().reshape(-1)  # choice-major: all first choices, then all second choices
    token_N = torch.arange(T, device=device).repeat(K)
    weight_N = weights_TK.t().reshape(-1)
    real_N = torch.ones_like(ids_N, dtype=torch.bool) if valid_T is None else valid_T.repeat(K)
    num_real = int(real_N.sum()) // K if valid_T is not None else T
    keyed_N = torch.where(real_N, ids_N, num_experts)  # padding sorts after every expert
    capacity = expert_capacity(capacity_factor, num_real, K, num_experts, min_capacity)
    num_dropped = 0
    if capacity is not None:
        priority_N = None
        if K >= 3:
            priority_N = (weights_TK if priority_TK is None else priority_TK).t().reshape(-1)
        over_N = real_N & (_rank_within_expert(keyed_N, num_experts, priority_N) >= capacity)
        num_dropped = int(over_N.sum())
        keyed_N = keyed_N.masked_fill(over_N, num_experts)  # dropped ones sort with the padding
    order_N = torch.argsort(keyed_N, stable=True)
    counts_E = torch.bincount(keyed_N, minlength=num_experts + 1)[:num_experts]
    kept_N = order_N[: int(counts_E.sum())]
    dropped_weight_T = None
    if num_dropped or valid_T is not None and num_real < T:
        dropped_N = torch.ones_like(ids_N, dtype=torch.bool)
        dropped_N[kept_N] = False
        dropped_weight_T = (weight_N * dropped_N).reshape(K, T).sum(0)
    return Dispatch(
        token_N=token_N[kept_N],
        weight_N=weight_N[kept_N],
        groups=ExpertGroups.from_counts(counts_E),
        dropped_weight_T=dropped_weight_T,
        num_routed=num_real * K,
        num_dropped=num_dropped,
    )


def _rank_within_expert(
    keyed_N: torch.Tensor, num_experts: int, priority_N: torch.Tensor | None
) -> torch.Tensor:
    """Each assignment's place in its expert's queue: by position, or by descending priority first."""
    order_N = torch.arange(len(keyed_N), device=keyed_N.device)
    if priority_N is not None:
        order_N = torch.argsort(priority_N, descending=True, stable=True)
    order_N = order_N[torch.argsort(keyed_N[order_N], stable=True)]
    sorted_ids_N = keyed_N[order_N]
    counts_E = torch.bincount(sorted_ids_N, minlength=num_experts + 1)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    rank_N = torch.empty_like(order_N)
    rank_N[order_N] = torch.arange(len(order_N), device=keyed_N.device) - starts_E[sorted_ids_N]
    return rank_N


def sort_by_expert(ids_TK: torch.Tensor, weights_TK: torch.Tensor, num_experts: int) -> Dispatch:
    """Every assignment, grouped by expert (dropless, no padding)."""
    return dispatch(ids_TK, weights_TK, num_experts)


def grouped_linear(x_NI: torch.Tensor, w_EIO: torch.Tensor, groups: ExpertGroups) -> torch.Tensor:
    """Row group e of `x_NI` times `w_EIO[e]`, for every expert, in one grouped matmul.

    `grouped_mm` needs fp32/bf16/fp16 and 16-byte-aligned strides; anything else (float64 or odd
    widths, seen only with tiny test shapes) falls back to a loop over experts.
    """
    row_bytes = x_NI.element_size()
    if (
        x_NI.dtype in GROUPED_MM_DTYPES
        and (x_NI.shape[1] * row_bytes) % 16 == 0
        and (w_EIO.shape[2] * row_bytes) % 16 == 0
    ):
        return F.grouped_mm(x_NI, w_EIO, offs=groups.offsets_E)
    out, start = [], 0
    for e, count in enumerate(groups.counts_E.tolist()):
        out.append(x_NI[start : start + count] @ w_EIO[e])
        start += count
    return torch.cat(out) if out else x_NI.new_zeros(0, w_EIO.shape[2])


def combine(y_NO: torch.Tensor, d: Dispatch, num_tokens: int) -> torch.Tensor:
    """Sums assignment rows back into their tokens (rows must already carry their gate weight)."""
    out_TO = y_NO.new_zeros(num_tokens, y_NO.shape[1])
    return out_TO.index_add(0, d.token_N, y_NO)
