"""The MoE-LoRA block: router, dispatch and upcycled LoRA experts around one frozen SwiGLU FFN.

For SwiGLU with experts W_e = W + ΔW_e:
    sum_e g_e (W2 + ΔW2_e) h_e = W2 (sum_e g_e h_e) + sum_e g_e ΔW2_e h_e,
so W1 and W3 run once on x and W2 once on the gate-weighted sum: one dense FFN plus K small LoRA paths.

Router fading (`moe.fade_fraction`) blends the block toward its merged expert, the FFN with
W + Σ_e u_e ΔW_e (u = each expert's measured share): out = α·MoE(x) + (1−α)·merged(x), α → 0. At α = 0
the block is exactly the dense FFN that the export folds to.

Shared experts (`moe.shared_experts`, MTLoRA's task-agnostic LoRA, DeepSeek's shared expert) are LoRA
factors that every token uses: they join the frozen weights, so each routed expert is W + ΔW_s + ΔW_e.

With MOELoRA's per-task gate (`moe.router: task_gate`) every token of task t mixes all experts per
projection, W + ΔW_s + Σ_e g_{t,e} ΔW_e, so each task has an exact dense model.

Under expert parallelism the LoRA paths of an assignment run on the rank that owns its expert: the rank
sends the row [x, W1 x, W3 x] and gets back [h_e, ΔW2_e h_e] (see `mtmoe.parallel.expert_parallel`).

Shape legend: B batch, S sequence, T = B*S tokens, D hidden, F FFN width, E experts, K top-k,
N = T*K assignments sorted by expert.
"""

from __future__ import annotations

import torch
from torch import nn

from mtmoe.model.dispatch import Dispatch, ExpertGroups, combine
from mtmoe.model.experts import UpcycledLoRAExperts
from mtmoe.model.moe_base import MoEBlock, RoutingContext
from mtmoe.model.routers import Router, RouterOutput
from mtmoe.parallel.expert_parallel import ExpertPlacement, expert_parallel_apply

try:  # what HF's ACT2FN["silu"] is in recent transformers (nn.SiLU in older ones)
    from transformers.activations import SiLUActivation
except ImportError:  # pragma: no cover
    SiLUActivation = nn.SiLU
SILU_TYPES = (nn.SiLU, SiLUActivation)


class MoELoRAFFN(MoEBlock):
    """Replaces one SwiGLU FFN (an HF `*MLP` with gate_proj/up_proj/down_proj/act_fn).

    Args:
        base_mlp: The frozen dense FFN, used once per forward.
        router: Chooses K experts per token, or a per-task gate over all experts.
        experts: The per-expert LoRA factors (this rank's share of them under expert parallelism).
        context: The model's shared routing context.
        placement: Where the experts live (default: all on this rank).
        capacity_factor: 0 for dropless routing, else the per-rank expert capacity factor (training
            only; evaluation is always dropless).
        shared: Always-on LoRA experts (None = none).
    """

    def __init__(
        self,
        base_mlp: nn.Module,
        router: Router,
        experts: UpcycledLoRAExperts,
        context: RoutingContext,
        placement: ExpertPlacement | None = None,
        capacity_factor: float = 0.0,
        shared: UpcycledLoRAExperts | None = None,
    ):
        super().__init__(router.num_experts, context)
        self.base, self.router, self.experts, self.shared = base_mlp, router, experts, shared
        self.placement = placement or ExpertPlacement(router.num_experts)
        self.capacity_factor = capacity_factor
        E = router.num_experts
        # Router fading's constant gates (each expert's measured share); set when fading starts.
        self.register_buffer("fade_shares_E", torch.full((E,), 1.0 / E), persistent=False)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        """Runs the block; appends the router's auxiliary loss to the context."""
        B, S, D = x_BSD.shape
        T = B * S
        x_TD = x_BSD.reshape(T, D)
        ctx = self.context
        gate_TF, up_TF = self.base.gate_proj(x_TD), self.base.up_proj(x_TD)
        if self.shared is not None:
            gate_TF = gate_TF + self._shared_delta("gate", x_TD)
            up_TF = up_TF + self._shared_delta("up", x_TD)
        if self.router.per_task:
            return self._task_gated(x_TD, gate_TF, up_TF).reshape(B, S, D)
        route = self.route(x_TD)
        d = self.dispatch_route(route, route.weights_TK, self.capacity_factor)

        # The cache-blocked CPU path loops over row blocks in Python: right for CPU caches, too many small
        # kernels for a GPU, which takes the grouped-matmul composition.
        fused = x_TD.device.type == "cpu" and isinstance(self.base.act_fn, SILU_TYPES)
        if self.placement.ep_size == 1 and fused:
            h_TF, down_TD = self._local_experts(x_TD, gate_TF, up_TF, d)
        else:  # the readable composition: GPU, expert parallelism, or an activation other than SiLU
            x_ND, gate_NF, up_NF = (t.index_select(0, d.token_N) for t in (x_TD, gate_TF, up_TF))
            if self.placement.ep_size == 1:
                h_NF, down_ND = self.expert_outputs(x_ND, gate_NF, up_NF, d.groups)
            else:
                h_NF, down_ND = self._remote_expert_outputs(x_ND, gate_NF, up_NF, d.groups.counts_E)
            w_N1 = d.weight_N[:, None]
            h_TF, down_TD = combine(h_NF * w_N1, d, T), combine(down_ND * w_N1, d, T)
        if d.dropped_weight_T is not None:  # dropped assignments (and padding) keep the frozen FFN
            h_TF = h_TF + self.base.act_fn(gate_TF) * up_TF * d.dropped_weight_T[:, None].to(h_TF.dtype)
        out_TD = self._down(h_TF) + down_TD
        alpha = ctx.fade_alpha
        if alpha < 1.0:
            out_TD = alpha * out_TD + (1.0 - alpha) * self._merged_expert(x_TD, gate_TF, up_TF)
        return out_TD.reshape(B, S, D)

    def _local_experts(
        self, x_TD: torch.Tensor, gate_TF: torch.Tensor, up_TF: torch.Tensor, d: Dispatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What `expert_outputs` and two combines compute, for SiLU with every expert on this rank.

        The rank-R rows go where they are cheapest (X = T·E rows, one per (token, expert)):
        - x A_e of every expert for gate and up in one dense matmul over the T tokens, then each
          assignment's row picked from it, instead of N gathered rows of x in a grouped matmul;
        - the N×F work (gather, ΔW1/ΔW3, SiLU, gate weight, combine, and A_e of ΔW2) in `_ExpertSwiGLU`,
          cache-blocked, with a hand-written backward;
        - ΔW2's rank-R rows put at their (token, expert) and multiplied by every B_e in one dense matmul,
          instead of N×D rows combined.

        Returns:
            (h_TF, down_TD): Σ_n g_n h_n and Σ_n g_n ΔW2_e h_n per token.
        """
        ex, token_N = self.experts, d.token_N
        T, D = x_TD.shape
        E, R, dt = ex.num_local, ex.gate_a.shape[2], x_TD.dtype
        counts = d.groups.counts_E.tolist()
        expert_N = torch.repeat_interleave(
            torch.arange(E, device=x_TD.device), d.groups.counts_E, output_size=token_N.shape[0]
        )
        row_N = token_N * E + expert_N  # the (token, expert) row of a (T·E, ·) layout
        xa_XR2 = (x_TD @ ex.stacked_a(("gate", "up"), dt)).view(T * E, 2 * R)
        xa_NR2 = xa_XR2.index_select(0, row_N) * ex.scaling
        down_aT_ERF = ex.down_a.to(dt).transpose(1, 2).contiguous()
        h_TF, ha_NR = _ExpertSwiGLU.apply(
            gate_TF,
            up_TF,
            xa_NR2,
            ex.gate_b.to(dt),
            ex.up_b.to(dt),
            down_aT_ERF,
            d.weight_N.to(dt),
            token_N,
            expert_chunks(counts, chunk_rows(gate_TF)),
        )
        ha_XR = ha_NR.new_zeros(T * E, R).index_add(0, row_N, ha_NR * ex.scaling)
        return h_TF, ha_XR.view(T, E * R) @ ex.down_b.to(dt).view(E * R, D)

    def _merged_expert(self, x_TD: torch.Tensor, gate_TF: torch.Tensor, up_TF: torch.Tensor) -> torch.Tensor:
        """The FFN with W + Σ_e u_e ΔW_e on every projection: exactly what the export folds to."""
        ex, u_E = self.experts, self.fade_shares_E
        gate_TF = gate_TF + ex.merged_delta("gate", x_TD, u_E)
        h_TF = self.base.act_fn(gate_TF) * (up_TF + ex.merged_delta("up", x_TD, u_E))
        return self._down(h_TF) + ex.merged_delta("down", h_TF, u_E)

    def _task_gated(self, x_TD: torch.Tensor, gate_TF: torch.Tensor, up_TF: torch.Tensor) -> torch.Tensor:
        """Every token mixes all experts per projection with its task's gate: W + Σ_e g_{t,e} ΔW_e."""
        ctx, ex = self.context, self.experts
        T, E = x_TD.shape[0], self.num_experts
        g_TE = self.router.gates(ctx.task_T, T)
        ids_TE = torch.arange(E, device=x_TD.device).expand(T, E)
        ctx.add_route(RouterOutput(weights_TK=g_TE, ids_TK=ids_TE, aux_loss=g_TE.new_zeros(())))
        if ctx.record:
            self.record(ids_TE, g_TE)
        gate_TF = gate_TF + ex.merged_delta("gate", x_TD, g_TE)
        h_TF = self.base.act_fn(gate_TF) * (up_TF + ex.merged_delta("up", x_TD, g_TE))
        return self._down(h_TF) + ex.merged_delta("down", h_TF, g_TE)

    def _shared_delta(self, proj: str, x_TI: torch.Tensor) -> torch.Tensor:
        ones_S = x_TI.new_ones(self.shared.num_local)
        return self.shared.merged_delta(proj, x_TI, ones_S)

    def _down(self, h_TF: torch.Tensor) -> torch.Tensor:
        """The frozen W2 plus the shared experts' ΔW2."""
        out_TD = self.base.down_proj(h_TF)
        return out_TD if self.shared is None else out_TD + self._shared_delta("down", h_TF)

    def expert_outputs(
        self, x_ND: torch.Tensor, gate_NF: torch.Tensor, up_NF: torch.Tensor, groups: ExpertGroups
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs this rank's experts on rows grouped by (local) expert.

        Args:
            x_ND: Block inputs.
            gate_NF: The frozen W1 x of the same rows.
            up_NF: The frozen W3 x of the same rows.
            groups: Rows per local expert.

        Returns:
            (h_e, ΔW2_e h_e) per row, both without the gate weight.
        """
        ex = self.experts
        h_NF = self.base.act_fn(gate_NF + ex.delta("gate", x_ND, groups)) * (
            up_NF + ex.delta("up", x_ND, groups)
        )
        return h_NF, ex.delta("down", h_NF, groups)

    def _remote_expert_outputs(
        self, x_ND: torch.Tensor, gate_NF: torch.Tensor, up_NF: torch.Tensor, counts_E: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`expert_outputs`, each row computed by the rank that owns its expert."""
        D, F = x_ND.shape[1], gate_NF.shape[1]

        def local(rows_MC: torch.Tensor, counts_L: torch.Tensor) -> torch.Tensor:
            x_MD, gate_MF, up_MF = rows_MC.split([D, F, F], dim=1)
            groups = ExpertGroups.from_counts(counts_L.to(rows_MC.device))
            return torch.cat(self.expert_outputs(x_MD, gate_MF, up_MF, groups), dim=1)

        rows_NC = torch.cat([x_ND, gate_NF, up_NF], dim=1)
        out_NC = expert_parallel_apply(rows_NC, counts_E, self.placement, local)
        h_NF, down_ND = out_NC.split([F, D], dim=1)
        return h_NF, down_ND


CHUNK_BYTES = 3 << 18  # 768 KiB: one row block of each of the few N×F buffers stays in L2 at a time


def chunk_rows(like_TF: torch.Tensor) -> int:
    """Rows per cache block of `_ExpertSwiGLU` for rows like `like_TF` (128 for fp32 rows of 1536)."""
    return max(16, CHUNK_BYTES // (like_TF.shape[1] * like_TF.element_size()))


def expert_chunks(counts_E: list[int], rows: int) -> list[tuple[int, int, int]]:
    """Splits rows grouped by expert into blocks of at most `rows` rows that each hold one expert.

    Returns:
        (expert, start, end) per block, in row order.
    """
    out, start = [], 0
    for e, count in enumerate(counts_E):
        out += [(e, n, min(n + rows, start + count)) for n in range(start, start + count, rows)]
        start += count
    return out


class _ExpertSwiGLU(torch.autograd.Function):
    """The N×F part of the upcycled experts with SiLU, one row block (one expert) at a time.

    For assignment n of token t, expert e, gate weight w (xa: its scaled rank-R rows of x for ΔW1, ΔW3):
        g = gate_TF[t] + xa_g B1_e,   u = up_TF[t] + xa_u B3_e,   hw = w · silu(g) · u,
        h_TF[t] += hw,                ha_n = hw A2_e.
    Composed from torch ops (`expert_outputs`), autograd keeps half a dozen N×F tensors and makes a
    dozen passes over N×F memory each way; here a block's rows stay in cache from the gather to the
    combine, nothing N×F is kept for the backward (it recomputes g, u and silu(g) from the kept T×F
    `gate_TF` and `up_TF`), and the weight grads accumulate block by block. The blocks loop in Python:
    about N / `chunk_rows` + E of them.

    Inputs: gate_TF, up_TF (T, F); xa_NR2 (N, 2R); gate_b_ERF, up_b_ERF (E, R, F); down_aT_ERF (E, R, F),
    A2 transposed; weight_N (N,); token_N (N,); chunks from `expert_chunks`. Outputs: h_TF (T, F) and
    ha_NR (N, R).
    """

    @staticmethod
    def forward(ctx, gate_TF, up_TF, xa_NR2, gate_b_ERF, up_b_ERF, down_aT_ERF, weight_N, token_N, chunks):
        ctx.save_for_backward(gate_TF, up_TF, xa_NR2, gate_b_ERF, up_b_ERF, down_aT_ERF, weight_N, token_N)
        ctx.chunks = chunks
        R = gate_b_ERF.shape[1]
        h_TF = torch.zeros_like(gate_TF)
        haT_RN = gate_TF.new_empty(R, token_N.shape[0])
        g_CF, u_CF, sg_CF = _buffers(gate_TF, chunks, 3)
        for e, n0, n1 in chunks:
            g, u = _gate_up(gate_TF, up_TF, xa_NR2, gate_b_ERF, up_b_ERF, token_N, e, n0, n1, g_CF, u_CF)
            sg = torch.ops.aten.silu.out(g, out=sg_CF[: n1 - n0])
            hw = u.mul_(sg).mul_(weight_N[n0:n1, None])
            h_TF.index_add_(0, token_N[n0:n1], hw)
            haT_RN[:, n0:n1] = down_aT_ERF[e] @ hw.t()  # (R×F)(F×c): the fast layout for a thin product
        return h_TF, haT_RN.t()

    @staticmethod
    def backward(ctx, dh_TF, dha_NR):
        gate_TF, up_TF, xa_NR2, gate_b_ERF, up_b_ERF, down_aT_ERF, weight_N, token_N = ctx.saved_tensors
        R = gate_b_ERF.shape[1]
        dgate_TF, dup_TF = torch.zeros_like(dh_TF), torch.zeros_like(dh_TF)
        dxaT_RN = xa_NR2.new_empty(2 * R, xa_NR2.shape[0])
        dgate_b, dup_b, ddown_aT = (torch.zeros_like(t) for t in (gate_b_ERF, up_b_ERF, down_aT_ERF))
        dweight_N = torch.empty_like(weight_N)
        g_CF, u_CF, sg_CF, grad_CF, tmp_CF = _buffers(dh_TF, ctx.chunks, 5)
        for e, n0, n1 in ctx.chunks:
            c, tok, w = n1 - n0, token_N[n0:n1], weight_N[n0:n1, None]
            g, u = _gate_up(gate_TF, up_TF, xa_NR2, gate_b_ERF, up_b_ERF, token_N, e, n0, n1, g_CF, u_CF)
            sg = torch.ops.aten.silu.out(g, out=sg_CF[:c])
            dha = dha_NR[n0:n1]
            grad = torch.index_select(dh_TF, 0, tok, out=grad_CF[:c]).addmm_(dha, down_aT_ERF[e])  # d(hw)
            h = torch.mul(sg, u, out=tmp_CF[:c])
            ddown_aT[e].addmm_((dha * w).t(), h)
            torch.sum(h.mul_(grad), 1, out=dweight_N[n0:n1])
            grad.mul_(w)  # d(silu(g) · u)
            du = torch.mul(grad, sg, out=tmp_CF[:c])
            dup_TF.index_add_(0, tok, du)
            dxaT_RN[R:, n0:n1] = up_b_ERF[e] @ du.t()
            dup_b[e].addmm_(xa_NR2[n0:n1, R:].t(), du)
            dg = torch.ops.aten.silu_backward.grad_input(grad.mul_(u), g, grad_input=tmp_CF[:c])
            dgate_TF.index_add_(0, tok, dg)
            dxaT_RN[:R, n0:n1] = gate_b_ERF[e] @ dg.t()
            dgate_b[e].addmm_(xa_NR2[n0:n1, :R].t(), dg)
        return dgate_TF, dup_TF, dxaT_RN.t(), dgate_b, dup_b, ddown_aT, dweight_N, None, None


def _buffers(like_TF: torch.Tensor, chunks: list[tuple[int, int, int]], count: int) -> list[torch.Tensor]:
    """`count` scratch row blocks as tall as the largest chunk."""
    rows = max((n1 - n0 for _, n0, n1 in chunks), default=0)
    return [like_TF.new_empty(rows, like_TF.shape[1]) for _ in range(count)]


def _gate_up(gate_TF, up_TF, xa_NR2, gate_b_ERF, up_b_ERF, token_N, e, n0, n1, g_CF, u_CF):
    """One block's g = gate_TF[t] + xa_g B1_e and u = up_TF[t] + xa_u B3_e, written into the scratch."""
    R, c, tok = gate_b_ERF.shape[1], n1 - n0, token_N[n0:n1]
    g = torch.index_select(gate_TF, 0, tok, out=g_CF[:c]).addmm_(xa_NR2[n0:n1, :R], gate_b_ERF[e])
    u = torch.index_select(up_TF, 0, tok, out=u_CF[:c]).addmm_(xa_NR2[n0:n1, R:], up_b_ERF[e])
    return g, u
