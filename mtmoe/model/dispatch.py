"""Local dispatch: sort token-expert assignments by expert, grouped matmuls, weighted combine.

Shape legend: T tokens, K experts per token, N = T*K assignments (sorted by expert), E experts,
I/O input and output widths of a grouped matmul.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class Dispatch:
    """Assignments sorted by expert.

    Attributes:
        token_N: Source token of each sorted assignment.
        weight_N: Gate weight of each sorted assignment.
        counts_E: Assignments per expert.
        offsets_E: Cumulative end of each expert's group (int32, as `grouped_mm` wants).
    """

    token_N: torch.Tensor
    weight_N: torch.Tensor
    counts_E: torch.Tensor
    offsets_E: torch.Tensor


def sort_by_expert(ids_TK: torch.Tensor, weights_TK: torch.Tensor, num_experts: int) -> Dispatch:
    """Groups the (token, expert) assignments by expert id, stably."""
    T, K = ids_TK.shape
    flat_ids_N = ids_TK.reshape(-1)
    order_N = torch.argsort(flat_ids_N, stable=True)
    counts_E = torch.bincount(flat_ids_N, minlength=num_experts)
    token_N = torch.arange(T, device=ids_TK.device).repeat_interleave(K)[order_N]
    return Dispatch(
        token_N=token_N,
        weight_N=weights_TK.reshape(-1)[order_N],
        counts_E=counts_E,
        offsets_E=torch.cumsum(counts_E, 0).to(torch.int32),
    )


def grouped_linear(x_NI: torch.Tensor, w_EIO: torch.Tensor, d: Dispatch) -> torch.Tensor:
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
        return F.grouped_mm(x_NI, w_EIO, offs=d.offsets_E)
    out, start = [], 0
    for e, count in enumerate(d.counts_E.tolist()):
        out.append(x_NI[start : start + count] @ w_EIO[e])
        start += count
    return torch.cat(out)


def combine(y_NO: torch.Tensor, d: Dispatch, num_tokens: int) -> torch.Tensor:
    """Sums assignment rows back into their tokens (rows must already carry their gate weight)."""
    out_TO = y_NO.new_zeros(num_tokens, y_NO.shape[1])
    return out_TO.index_add(0, d.token_N, y_NO)
