"""MoEfied experts (EMTAL): a pretrained SwiGLU FFN split into E slices of its neurons, each with a LoRA.

The F intermediate neurons are partitioned by balanced k-means (each neuron's feature: its rows of W_up
and W_gate, L2-normalised) into E slices of f = F/E neurons. The neurons are permuted so that slice e is
contiguous, and each slice gets its own LoRA on its part of gate, up and down. A gate ω_e per token
scales slice e's hidden activations h_e = act(gate_e) * up_e before W_down:
    out = Σ_e (W_down,e + ΔW_down,e) (ω_e h_e),
so with every ω_e = 1 the block is exactly the dense FFN (plus the LoRA deltas).

Routers:
- soft (EMTAL): ω = E · softmax(LN(x) W_r / τ) over every slice; every slice runs (dense path).
- top-k: a token-choice router picks K slices; they get ω = K · (renormalised weight), so their mean ω
  is 1, and the other slices are not computed at all (sorted dispatch and grouped matmuls).
Router fading (`context.fade_alpha` = α < 1) blends every gate toward 1, ω ← α·ω + (1 − α), so at α = 0
the block is exactly the dense FFN that `MoEfiedFFN.dense_weights` exports.

Shape legend: T tokens, D hidden size, F FFN width, E slices (experts), f = F/E neurons per slice,
K slices per token, R LoRA rank, N sorted assignments, C neuron feature width.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as Fn
from torch import nn

from mtmoe.model.dispatch import Dispatch, combine, grouped_linear
from mtmoe.model.experts import UpcycledLoRAExperts
from mtmoe.model.moe_base import MoEBlock, RoutingContext
from mtmoe.model.routers.soft import SoftSliceRouter

PROJ_NAMES = ("gate_proj", "up_proj", "down_proj")


def neuron_features(mlp: nn.Module) -> torch.Tensor:
    """Each neuron's k-means feature: its rows of W_up and W_gate, concatenated and L2-normalised (F, 2D)."""
    feats_FC = torch.cat([mlp.up_proj.weight.detach().float(), mlp.gate_proj.weight.detach().float()], dim=1)
    return Fn.normalize(feats_FC, dim=1)


def balanced_kmeans(
    features_FC: torch.Tensor, num_clusters: int, iters: int = 20, seed: int = 0
) -> torch.Tensor:
    """K-means on the rows of `features_FC` with every cluster holding exactly F / E rows.

    Initialised by k-means++ (seeded), then alternates a capacity-constrained assignment
    (`_balanced_assign`) and a centroid update until the assignment stops changing or `iters` runs out.

    Args:
        features_FC: One feature row per neuron.
        num_clusters: E.
        iters: Most assignment/update rounds.
        seed: Seed of the k-means++ initialisation; the result is deterministic for a seed.

    Returns:
        assign_F: The cluster of every row (long), each cluster exactly F / E times.

    Raises:
        ValueError: If F is not divisible by E (naming `moe.num_experts`).
    """
    F, E = features_FC.shape[0], num_clusters
    if E < 1 or F % E:
        raise ValueError(f"config key 'moe.num_experts': {E} must divide the FFN width {F} (moefied)")
    x_FC = features_FC.detach()
    if x_FC.dtype != torch.float64:
        x_FC = x_FC.float()
    sq_F = x_FC.pow(2).sum(1)
    if x_FC.is_meta:  # shapes only (e.g. launch/plan.py): no clustering without weights
        return torch.arange(F, device="meta") // (F // E)
    centers_EC = _kmeans_pp(x_FC, sq_F, E, torch.Generator(device="cpu").manual_seed(seed))
    assign_F = None
    for _ in range(max(iters, 1)):
        new_F = _balanced_assign(_sq_dist(x_FC, sq_F, centers_EC), F // E)
        if assign_F is not None and torch.equal(new_F, assign_F):
            break
        assign_F = new_F
        sums_EC = x_FC.new_zeros(E, x_FC.shape[1]).index_add_(0, assign_F, x_FC)
        centers_EC = sums_EC / (F // E)
    return assign_F


def _sq_dist(x_FC: torch.Tensor, sq_F: torch.Tensor, centers_EC: torch.Tensor) -> torch.Tensor:
    """Squared distances of every row to every centre, through one matmul (F, E)."""
    return (sq_F[:, None] - 2 * (x_FC @ centers_EC.t()) + centers_EC.pow(2).sum(1)).clamp_min(0)


def _kmeans_pp(
    x_FC: torch.Tensor, sq_F: torch.Tensor, num_clusters: int, gen: torch.Generator
) -> torch.Tensor:
    """K-means++ seeding: each next centre drawn with probability ∝ squared distance to the nearest one."""
    F = x_FC.shape[0]
    centers = [x_FC[int(torch.randint(F, (1,), generator=gen))]]
    d2_F = _sq_dist(x_FC, sq_F, centers[0][None])[:, 0]
    for _ in range(num_clusters - 1):
        total = float(d2_F.sum())
        probs_F = (d2_F / total).cpu() if total > 0 else torch.full((F,), 1.0 / F)
        centers.append(x_FC[int(torch.multinomial(probs_F, 1, generator=gen))])
        d2_F = torch.minimum(d2_F, _sq_dist(x_FC, sq_F, centers[-1][None])[:, 0])
    return torch.stack(centers)


def _balanced_assign(dist_FE: torch.Tensor, capacity: int) -> torch.Tensor:
    """Greedy assignment with a capacity per cluster, vectorised in rounds.

    Each round, every unassigned row proposes to its nearest cluster that still has room, and each
    cluster accepts its closest proposals up to its room. A round either accepts every proposal or fills a
    cluster, so there are at most E rounds.
    """
    F, E = dist_FE.shape
    device = dist_FE.device
    assign_F = torch.full((F,), -1, dtype=torch.long, device=device)
    room_E = torch.full((E,), capacity, dtype=torch.long, device=device)
    for _ in range(E):
        free_M = (assign_F < 0).nonzero().squeeze(1)
        if free_M.numel() == 0:
            break
        d_ME = dist_FE[free_M].masked_fill(room_E == 0, float("inf"))
        best_M, choice_M = d_ME.min(dim=1)
        order_M = torch.argsort(best_M, stable=True)
        order_M = order_M[torch.argsort(choice_M[order_M], stable=True)]  # by cluster, then distance
        cluster_M = choice_M[order_M]
        counts_E = torch.bincount(cluster_M, minlength=E)
        rank_M = torch.arange(len(order_M), device=device) - (torch.cumsum(counts_E, 0) - counts_E)[cluster_M]
        accept_M = rank_M < room_E[cluster_M]
        assign_F[free_M[order_M[accept_M]]] = cluster_M[accept_M]
        room_E -= torch.bincount(cluster_M[accept_M], minlength=E)
    assert bool((assign_F >= 0).all()), "balanced assignment left rows unassigned (non-finite features?)"
    return assign_F


class MoEfiedFFN(MoEBlock):
    """A SwiGLU FFN (an HF `*MLP` with bias-free gate_proj/up_proj/down_proj and act_fn) split into slices.

    The frozen weights are kept once, permuted so that slice e is contiguous, in the grouped-matmul
    layout: gate/up (E, D, f) and down (E, f, D), as frozen parameters (so `.to(dtype)` moves them).
    The base mlp itself is not kept; `perm_F` maps the permuted positions back to the original neurons.

    In top-k mode, padding tokens and over-capacity assignments are not dispatched: their slices
    contribute zero (a padding token's output is unused anyway). With K = 1 every chosen ω is 1, so the
    router learns only from its auxiliary losses.

    Expert parallelism is not supported here: the frozen slices would have to be sharded with their LoRA.

    Args:
        base_mlp: The pretrained FFN; its weights are copied in, permuted, and it can then be dropped.
        num_experts: E; must divide F.
        top_k: K slices per token; 0 or E selects the soft (dense) router.
        rank: LoRA rank R of every slice.
        alpha: LoRA alpha (deltas scaled by alpha / R). The factors are drawn from the global torch RNG.
        context: The model's shared routing context.
        router: The top-k router (interface of `TopKRouter`, with `top_k == K`) in top-k mode; in soft
            mode a router over all E slices (`SoftSliceRouter`), or None to build one.
        tau: τ of the soft router built when `router` is None.
        capacity_factor: Top-k mode, training only: 0 is dropless, else the capacity of `expert_capacity`.
        kmeans_iters: Rounds of balanced k-means.
        kmeans_seed: Seed of the k-means initialisation.

    Raises:
        ValueError: For an FFN with biases, E not dividing F, or a router that does not match the mode.
    """

    def __init__(
        self,
        base_mlp: nn.Module,
        num_experts: int,
        top_k: int,
        rank: int,
        alpha: float,
        context: RoutingContext,
        router: nn.Module | None = None,
        tau: float = 5.0,
        capacity_factor: float = 0.0,
        kmeans_iters: int = 20,
        kmeans_seed: int = 0,
    ):
        super().__init__(num_experts, context)
        if any(getattr(base_mlp, n).bias is not None for n in PROJ_NAMES):
            raise ValueError("config key 'moe.family': moefied needs a SwiGLU FFN without biases")
        E = num_experts
        self.soft = top_k in (0, E)
        if self.soft and router is None:
            router = SoftSliceRouter(base_mlp.gate_proj.in_features, E, tau)
        if router is None or router.top_k != (E if self.soft else top_k):
            raise ValueError(
                f"config key 'moe.router': top_k={top_k} of {E} needs "
                + ("a router over every slice (soft)" if self.soft else f"a top-{top_k} router")
            )
        self.router, self.top_k, self.capacity_factor = router, top_k, capacity_factor
        self.act_fn = base_mlp.act_fn

        w_gate_FD, w_up_FD = base_mlp.gate_proj.weight.detach(), base_mlp.up_proj.weight.detach()
        w_down_DF = base_mlp.down_proj.weight.detach()
        D, f = w_gate_FD.shape[1], w_gate_FD.shape[0] // E
        assign_F = balanced_kmeans(neuron_features(base_mlp), E, kmeans_iters, kmeans_seed)
        perm_F = torch.argsort(assign_F, stable=True)  # slice e = positions e*f .. (e+1)*f - 1
        self.register_buffer("perm_F", perm_F)

        def frozen(t: torch.Tensor) -> nn.Parameter:
            return nn.Parameter(t.contiguous(), requires_grad=False)

        self.gate_EDf = frozen(w_gate_FD[perm_F].view(E, f, D).transpose(1, 2))
        self.up_EDf = frozen(w_up_FD[perm_F].view(E, f, D).transpose(1, 2))
        self.down_EfD = frozen(w_down_DF[:, perm_F].t().reshape(E, f, D))
        self.experts = UpcycledLoRAExperts(E, D, f, rank, alpha)
        # A weightless copy of the mlp's structure, for `to_dense_mlp` (kept out of the module tree).
        memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), False) for p in base_mlp.parameters()}
        self._template = (copy.deepcopy(base_mlp, memo),)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        """Runs the block; reports the router's losses, the dispatch counts and (optionally) utilization."""
        shape, D = x_BSD.shape, x_BSD.shape[-1]
        x_TD = x_BSD.reshape(-1, D)
        ctx, E = self.context, self.num_experts
        route = self.route(x_TD)
        num_valid = x_TD.shape[0] if ctx.valid_T is None else int(ctx.valid_T.sum())
        alpha = ctx.fade_alpha
        if self.soft:
            ctx.count(num_valid * E, 0, self.training)
            if ctx.record:
                self.record(route.ids_TK, route.weights_TK)
            omega_TE = route.weights_TK * E
            return self.dense_forward(x_TD, alpha * omega_TE + (1.0 - alpha)).reshape(shape)

        K = self.top_k
        share_TK = route.weights_TK / route.weights_TK.sum(dim=-1, keepdim=True)
        if alpha < 1.0:  # fading: the unchosen slices have ω = 0, so every slice runs
            if ctx.record:
                self.record(route.ids_TK, share_TK)
            ctx.count(num_valid * K, 0, self.training)
            omega_TE = share_TK.new_zeros(x_TD.shape[0], E).scatter(1, route.ids_TK, K * share_TK)
            if ctx.valid_T is not None:
                omega_TE = omega_TE * ctx.valid_T[:, None].to(omega_TE.dtype)
            return self.dense_forward(x_TD, alpha * omega_TE + (1.0 - alpha)).reshape(shape)
        d = self.dispatch_route(route, K * share_TK, self.capacity_factor, record_weights_TK=share_TK)
        return self.sparse_forward(x_TD, d).reshape(shape)

    def sparse_forward(self, x_TD: torch.Tensor, d: Dispatch) -> torch.Tensor:
        """Runs only the dispatched (token, slice) pairs, each scaled by its ω (`d.weight_N`)."""
        ex, g, dt = self.experts, d.groups, x_TD.dtype
        x_ND = x_TD[d.token_N]
        gate_Nf = grouped_linear(x_ND, self.gate_EDf.to(dt), g) + ex.delta("gate", x_ND, g)
        up_Nf = grouped_linear(x_ND, self.up_EDf.to(dt), g) + ex.delta("up", x_ND, g)
        h_Nf = self.act_fn(gate_Nf) * up_Nf * d.weight_N[:, None].to(dt)
        y_ND = grouped_linear(h_Nf, self.down_EfD.to(dt), g) + ex.delta("down", h_Nf, g)
        return combine(y_ND, d, x_TD.shape[0])

    def dense_forward(self, x_TD: torch.Tensor, omega_TE: torch.Tensor) -> torch.Tensor:
        """Runs every slice, slice e's hidden activations scaled by ω_TE[:, e] (ω ≡ 1: the dense FFN)."""
        T, D = x_TD.shape
        E, f = self.num_experts, self.down_EfD.shape[1]
        gate_TEf = (x_TD @ self._as_matrix(self.gate_EDf, x_TD.dtype)).view(T, E, f)
        up_TEf = (x_TD @ self._as_matrix(self.up_EDf, x_TD.dtype)).view(T, E, f)
        h_TEf = self.act_fn(gate_TEf + self._slice_delta_in("gate", x_TD)) * (
            up_TEf + self._slice_delta_in("up", x_TD)
        )
        h_TEf = h_TEf * omega_TE.to(h_TEf.dtype)[:, :, None]
        out_TD = h_TEf.reshape(T, E * f) @ self.down_EfD.to(x_TD.dtype).view(E * f, D)
        a_EfR, b_ERD = (t.to(x_TD.dtype) for t in self.experts.factors("down"))
        ha_TER = torch.einsum("tef,efr->ter", h_TEf, a_EfR)
        return out_TD + ha_TER.reshape(T, -1) @ b_ERD.reshape(-1, D) * self.experts.scaling

    @staticmethod
    def _as_matrix(w_EDf: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Slice weights (E, D, f) as one (D, E·f) matrix in permuted neuron order."""
        E, D, f = w_EDf.shape
        return w_EDf.to(dtype).transpose(0, 1).reshape(D, E * f)

    def _slice_delta_in(self, proj: str, x_TD: torch.Tensor) -> torch.Tensor:
        """Every slice's LoRA delta of gate or up, scaling · (x A_e) B_e, as (T, E, f)."""
        a_EDR, b_ERf = (t.to(x_TD.dtype) for t in self.experts.factors(proj))
        xa_TER = (x_TD @ self._as_matrix(a_EDR, x_TD.dtype)).view(x_TD.shape[0], *a_EDR.shape[::2])
        return torch.einsum("ter,erf->tef", xa_TER, b_ERf) * self.experts.scaling

    @torch.no_grad()
    def dense_weights(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The dense FFN with every slice's LoRA folded in, in the original neuron order.

        Args:
            dtype: Of the result and the folding arithmetic (fp32 for export; float64 in tests).

        Returns:
            `gate_proj` and `up_proj` (F, D) and `down_proj` (D, F), in `nn.Linear` layout.
        """
        ex = self.experts
        E, f, D = self.down_EfD.shape

        def lora_delta(proj: str) -> torch.Tensor:
            a_EIR, b_ERO = ex.factors(proj)
            return a_EIR.to(dtype) @ b_ERO.to(dtype) * ex.scaling

        def unpermute(w_FD: torch.Tensor) -> torch.Tensor:
            out_FD = torch.empty_like(w_FD)
            out_FD[self.perm_F] = w_FD
            return out_FD

        out = {}
        for proj in ("gate", "up"):
            w_EDf = getattr(self, f"{proj}_EDf").to(dtype) + lora_delta(proj)
            out[f"{proj}_proj"] = unpermute(w_EDf.transpose(1, 2).reshape(E * f, D))
        w_EfD = self.down_EfD.to(dtype) + lora_delta("down")
        out["down_proj"] = unpermute(w_EfD.reshape(E * f, D)).t().contiguous()
        return out

    def to_dense_mlp(self, dtype: torch.dtype | None = None) -> nn.Module:
        """A copy of the original mlp holding `dense_weights()`, in `dtype` (default: the frozen dtype)."""
        dtype = dtype or self.down_EfD.dtype
        mlp = copy.deepcopy(self._template[0])
        folded = self.dense_weights(torch.promote_types(dtype, torch.float32))
        state = {f"{k}.weight": w.to(dtype) for k, w in folded.items()}
        mlp.load_state_dict(state, assign=True)
        return mlp.requires_grad_(False)
