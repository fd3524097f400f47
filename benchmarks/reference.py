"""Reference modules: the plain FFN and LoRA the MoE blocks are compared with, and readable per-expert loops.

Each loop shares the parameters of the mtmoe block it wraps, so both compute the same function and the
benchmarks assert them equal before timing; only the way of computing it differs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtmoe.model.block import MoELoRAFFN
from mtmoe.model.lora import LoRALinear
from mtmoe.model.native import NativeMoELoRA


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


class NaiveMoELoRAFFN(nn.Module):
    """The obvious MoE-LoRA: expert e is a whole FFN with weights W + ΔW_e, run on its own tokens.

    Shares the router, base FFN and LoRA factors of an `MoELoRAFFN`, so both compute the same function;
    only the way of computing it differs (no shared-base identity: one full gate/up/down per expert).
    """

    def __init__(self, block: MoELoRAFFN):
        super().__init__()
        self.block = block

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        """Loops experts; each one gathers its tokens and runs a full FFN with its merged weights."""
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        base, experts, router = self.block.base, self.block.experts, self.block.router
        route = router(x_TD)
        merged = {
            proj: getattr(base, f"{proj}_proj").weight + experts.weight_delta(proj)  # (E, out, in)
            for proj in ("gate", "up", "down")
        }
        out_TD = x_TD.new_zeros(B * S, D)
        for e in range(router.num_experts):
            tok_M, slot_M = (route.ids_TK == e).nonzero(as_tuple=True)
            if tok_M.numel() == 0:
                continue
            x_MD = x_TD.index_select(0, tok_M)
            h_MF = F.silu(F.linear(x_MD, merged["gate"][e])) * F.linear(x_MD, merged["up"][e])
            y_MD = F.linear(h_MF, merged["down"][e]) * route.weights_TK[tok_M, slot_M, None]
            out_TD = out_TD.index_add(0, tok_M, y_MD)
        return out_TD.reshape(B, S, D)


class LoopMoELoRAFFN(nn.Module):
    """An `MoELoRAFFN`'s function, computed with a Python loop over experts (the usual LoRA-MoE code).

    Shares the block's router, frozen FFN and LoRA factors; reports the router loss to the same context.
    """

    def __init__(self, block: MoELoRAFFN):
        super().__init__()
        self.block = block

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        """Per expert: its tokens through W x + s·(x A_e) B_e on gate, up and down, weighted, summed."""
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        blk = self.block
        ctx, base, ex = blk.context, blk.base, blk.experts
        route = blk.router(x_TD, ctx.valid_T, ctx.task_T)
        ctx.add_route(route)
        out_TD = torch.zeros_like(x_TD)
        for e in range(blk.num_experts):
            tok_M, slot_M = (route.ids_TK == e).nonzero(as_tuple=True)
            if tok_M.numel() == 0:
                continue
            x_MD = x_TD.index_select(0, tok_M)

            def lora(proj: str, v: torch.Tensor, e: int = e) -> torch.Tensor:
                a, b = ex.factors(proj)
                return (v @ a[e]) @ b[e] * ex.scaling

            h_MF = F.silu(base.gate_proj(x_MD) + lora("gate", x_MD)) * (base.up_proj(x_MD) + lora("up", x_MD))
            y_MD = (base.down_proj(h_MF) + lora("down", h_MF)) * route.weights_TK[tok_M, slot_M, None]
            out_TD = out_TD.index_add(0, tok_M, y_MD)
        return out_TD.reshape(B, S, D)


class NativeLoRALoop(nn.Module):
    """HF's Mixtral expert loop with per-expert LoRA added the obvious way.

    Shares a `NativeMoELoRA`'s router, frozen experts and LoRA factors, so both compute the same function.
    """

    def __init__(self, block: NativeMoELoRA):
        super().__init__()
        self.block = block

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        """Loops the hit experts: gather tokens, frozen W_e plus LoRA per projection, weight, add back."""
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        blk, ex = self.block, self.block.experts
        route = blk.router(x_TD)
        out_TD = torch.zeros_like(x_TD)
        for e in route.ids_TK.unique().tolist():
            tok_M, slot_M = (route.ids_TK == e).nonzero(as_tuple=True)
            x_MD = x_TD[tok_M]
            gate_MF, up_MF = (x_MD @ blk.gate_up_LDG[e]).chunk(2, dim=-1)
            gate_MF = gate_MF + (x_MD @ ex.gate_a[e]) @ ex.gate_b[e] * ex.scaling
            up_MF = up_MF + (x_MD @ ex.up_a[e]) @ ex.up_b[e] * ex.scaling
            h_MF = blk.act_fn(gate_MF) * up_MF
            y_MD = h_MF @ blk.down_LFD[e] + (h_MF @ ex.down_a[e]) @ ex.down_b[e] * ex.scaling
            out_TD = out_TD.index_add(0, tok_M, y_MD * route.weights_TK[tok_M, slot_M, None])
        return out_TD.reshape(B, S, D)
