"""The frozen base stored in a narrower dtype than the compute (`model.frozen_dtype`).

With `model.dtype: float32` and `model.frozen_dtype: bfloat16`, the base's frozen Linear and Embedding
weights are kept in bf16 (half the bytes of the largest fixed cost of LoRA training) while activations,
LoRA factors and routers stay fp32. Each use casts the stored weight to the activation dtype for that one
product, and autograd saves the stored tensor, not the cast, so no fp32 copy of the base outlives one
matmul. bf16 -> fp32 is exact: the model computes what an fp32 model with bf16-rounded base weights
computes (QLoRA's storage/compute split, one step narrower).

The modules keep their names and state-dict keys: their class becomes a subclass of `nn.Linear` or
`nn.Embedding` whose forward casts, so HF code that checks `isinstance(m, nn.Linear)` still works.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CastWorkspace:
    """The buffers a model's narrow frozen weights are cast into.

    One per (dtype, device), grown to the largest weight cast. `store_frozen_` gives each model it
    stores one (the `workspace` of every stored module, which the fused loss also uses for the LM head),
    so the buffers live and die with that model.
    """

    def __init__(self):
        self._buffers: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def widened(self, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`weight` cast to `dtype`, written into this workspace's buffer for (dtype, device).

        The result is valid only until the next call: use it in one product and drop it. Reusing one
        buffer keeps the casts out of the allocator: a fresh copy per matmul, freed between activations
        of other sizes, fragments the CPU heap and raises the peak RSS. The buffer is as large as the
        largest weight cast whole, the transient a fresh cast would need: a decoder layer's largest
        projection, or a slice of the LM head in the fused loss, or the whole head once Quality
        Retaining asks for full logits.
        """
        key = (dtype, weight.device)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < weight.numel():
            buf = self._buffers[key] = torch.empty(weight.numel(), dtype=dtype, device=weight.device)
        return buf[: weight.numel()].view(weight.shape).copy_(weight)


class _StoredWeightLinear(torch.autograd.Function):
    """`F.linear` with a frozen weight cast to the input's dtype; backward recasts instead of saving it."""

    @staticmethod
    def forward(ctx, x_LI, weight_OI, bias_O, workspace: CastWorkspace):
        ctx.save_for_backward(weight_OI)
        ctx.workspace = workspace
        bias = None if bias_O is None else bias_O.to(x_LI.dtype)
        return F.linear(x_LI, workspace.widened(weight_OI, x_LI.dtype), bias)

    @staticmethod
    def backward(ctx, grad_LO: torch.Tensor):
        (weight_OI,) = ctx.saved_tensors
        grad_LI = (
            grad_LO @ ctx.workspace.widened(weight_OI, grad_LO.dtype) if ctx.needs_input_grad[0] else None
        )
        return grad_LI, None, None, None


class StoredLinear(nn.Linear):
    """A frozen `nn.Linear` whose weight is stored narrower than its input; computes in the input's dtype.

    Its `workspace` (set by `store_frozen_`, shared by the model's stored modules) holds the casts.
    """

    workspace: CastWorkspace

    def forward(self, x_LI: torch.Tensor) -> torch.Tensor:
        """`x_LI @ weight.T + bias`, computed in `x_LI`'s dtype."""
        return _StoredWeightLinear.apply(x_LI, self.weight, self.bias, self.workspace)


class StoredEmbedding(nn.Embedding):
    """A frozen `nn.Embedding` whose rows are stored narrower; returns them in `compute_dtype`."""

    compute_dtype: torch.dtype = torch.float32

    def forward(self, ids_L: torch.Tensor) -> torch.Tensor:
        """The rows of `ids_L`, in `compute_dtype`."""
        return super().forward(ids_L).to(self.compute_dtype)


def store_frozen_(lm: nn.Module, frozen_dtype: torch.dtype, compute_dtype: torch.dtype) -> int:
    """Stores every frozen Linear and Embedding weight of `lm` in `frozen_dtype`, in place.

    Call it after the trainable parameters exist (LoRA factors, routers): only modules whose weight does
    not require grad are touched. A weight shared by several modules (tied embeddings) is cast once and
    stays shared.

    Args:
        lm: The model (the HF causal LM with mtmoe's blocks injected).
        frozen_dtype: The storage dtype of the frozen weights, e.g. `torch.bfloat16`.
        compute_dtype: The dtype of the activations (the model dtype), e.g. `torch.float32`.

    Returns:
        The number of frozen weight elements now stored in `frozen_dtype`.
    """
    if frozen_dtype == compute_dtype:
        return 0
    cast: set[int] = set()
    stored = 0
    workspace = CastWorkspace()
    for module in lm.modules():
        if type(module) is nn.Linear:
            new_class: type[nn.Module] = StoredLinear
        elif type(module) is nn.Embedding:
            new_class = StoredEmbedding
        else:
            continue
        params = [p for p in (module.weight, getattr(module, "bias", None)) if p is not None]
        if any(p.requires_grad for p in params):
            continue
        for p in params:
            if id(p) not in cast:
                cast.add(id(p))
                stored += p.numel()
                p.data = p.data.to(frozen_dtype)  # in place on the Parameter: a tied weight stays tied
        # The class swap keeps the module's name, keys and isinstance checks; only forward changes.
        module.__class__ = new_class
        if new_class is StoredEmbedding:
            module.compute_dtype = compute_dtype
        else:
            module.workspace = workspace
    return stored
