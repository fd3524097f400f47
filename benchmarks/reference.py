"""Reference modules: the plain FFN and LoRA the MoE blocks are compared with, and readable per-expert loops.

Each loop shares the parameters of the mtmoe block it wraps, so both compute the same function and the
benchmarks assert them equal before timing; only the way of computing it differs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtmoe.model.lora import LoRALinear
from mtmoe.model.routers import RouterOutput


class SwiGLU(nn.Module):
    """A Llama-style FFN: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, ffn_dim, bias=False)
        self.up_proj = nn.Linear(dim, ffn_dim, bias=False)
        self.down_proj = nn.Linear(ffn_dim, dim, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dense SwiGLU."""
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class PlainLoRAFFN(nn.Module):
    """The frozen FFN with one plain LoRA on each of gate, up and down (what a PEFT user would train)."""

    def __init__(self, base: SwiGLU, rank: int, alpha: float):
        super().__init__()
        self.gate_proj = LoRALinear(base.gate_proj, rank, alpha)
        self.up_proj = LoRALinear(base.up_proj, rank, alpha)
        self.down_proj = LoRALinear(base.down_proj, rank, alpha)
        self.act_fn = base.act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """SwiGLU with LoRA-adapted projections."""
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class ExpertLoop(nn.Module):
    """A block's function as a Python loop over the hit experts: gather, compute, weight, add back.

    Subclasses say how to route (`route`), what to prepare once per call (`prepare`) and what one expert
    computes on its tokens (`expert`).
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def route(self, x_TD: torch.Tensor) -> RouterOutput:
        """The block's routing of the tokens."""
        return self.block.router(x_TD)

    def prepare(self) -> object:
        """What every expert of one call needs (nothing by default)."""
        return None

    def expert(self, e: int, x_MD: torch.Tensor, prepared: object) -> torch.Tensor:
        """Expert `e`'s output on its tokens, before the gate weight."""
        raise NotImplementedError

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        """Loops the hit experts in ascending order; each one's tokens go through `expert`."""
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        route, prepared = self.route(x_TD), self.prepare()
        out_TD = torch.zeros_like(x_TD)
        for e in route.ids_TK.unique().tolist():
            tok_M, slot_M = (route.ids_TK == e).nonzero(as_tuple=True)
            y_MD = self.expert(e, x_TD.index_select(0, tok_M), prepared)
            out_TD = out_TD.index_add(0, tok_M, y_MD * route.weights_TK[tok_M, slot_M, None])
        return out_TD.reshape(B, S, D)


class NaiveMoELoRAFFN(ExpertLoop):
    """The obvious MoE-LoRA: expert e is a whole FFN with weights W + ΔW_e, run on its own tokens.

    Shares the router, base FFN and LoRA factors of an `MoELoRAFFN` (no shared-base identity: one full
    gate/up/down per expert).
    """

    def prepare(self) -> dict[str, torch.Tensor]:
        """Per projection, the merged weights of every expert, (E, out, in)."""
        base, experts = self.block.base, self.block.experts
        return {
            p: getattr(base, f"{p}_proj").weight + experts.weight_delta(p) for p in ("gate", "up", "down")
        }

    def expert(self, e: int, x_MD: torch.Tensor, merged: dict[str, torch.Tensor]) -> torch.Tensor:
        """A full SwiGLU with expert `e`'s merged weights."""
        h_MF = F.silu(F.linear(x_MD, merged["gate"][e])) * F.linear(x_MD, merged["up"][e])
        return F.linear(h_MF, merged["down"][e])


class LoopMoELoRAFFN(ExpertLoop):
    """An `MoELoRAFFN`'s function as most LoRA-MoE code runs it (MixLoRA-style, HF's per-expert loop).

    Per expert: the frozen gate/up/down on its tokens plus its LoRA paths, so each token pays the frozen FFN
    once per chosen expert. Reports the router loss to the block's context.
    """

    def route(self, x_TD: torch.Tensor) -> RouterOutput:
        """Routes as the block does in the model (padding and task ids from the context)."""
        ctx = self.block.context
        route = self.block.router(x_TD, ctx.valid_T, ctx.task_T)
        ctx.add_route(route)
        return route

    def expert(self, e: int, x_MD: torch.Tensor, prepared: object) -> torch.Tensor:
        """W x + s·(x A_e) B_e on gate, up and down."""
        base, ex = self.block.base, self.block.experts

        def lora(proj: str, v: torch.Tensor) -> torch.Tensor:
            a, b = ex.factors(proj)
            return (v @ a[e]) @ b[e] * ex.scaling

        h_MF = F.silu(base.gate_proj(x_MD) + lora("gate", x_MD)) * (base.up_proj(x_MD) + lora("up", x_MD))
        return base.down_proj(h_MF) + lora("down", h_MF)


class NativeLoRALoop(ExpertLoop):
    """HF's Mixtral expert loop with per-expert LoRA added the obvious way, on a `NativeMoELoRA`'s weights."""

    def expert(self, e: int, x_MD: torch.Tensor, prepared: object) -> torch.Tensor:
        """Frozen W_e plus s·(x A_e) B_e on gate, up and down."""
        blk, ex = self.block, self.block.experts
        gate_MF, up_MF = (x_MD @ blk.gate_up_LDG[e]).chunk(2, dim=-1)
        gate_MF = gate_MF + (x_MD @ ex.gate_a[e]) @ ex.gate_b[e] * ex.scaling
        up_MF = up_MF + (x_MD @ ex.up_a[e]) @ ex.up_b[e] * ex.scaling
        h_MF = blk.act_fn(gate_MF) * up_MF
        return h_MF @ blk.down_LFD[e] + (h_MF @ ex.down_a[e]) @ ex.down_b[e] * ex.scaling
