"""The token-choice top-k router (`moe.router: topk`, the default), with its balancing options.

Options (`moe.router_options`, `TopKOptions`):
- scores: `softmax` over experts, or `sigmoid` per expert (DeepSeek-V3); either way the chosen
  weights can be renormalised to sum to one;
- noisy gating: Gaussian noise of a fixed std on the logits while training;
- the load-balance auxiliary loss (Switch) and the z-loss (ST-MoE), both returned for the block to report;
- auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias, added to the scores only to choose
  experts, nudged after each optimizer step toward the under-loaded experts (`update_balance_biases`);
- task-aware routing: a learned task embedding added to the router's input.
Experts reserved for a task or a group of tasks (`moe.task_experts`) come in as a (task, expert) mask
that hides the other groups' experts from a token.

Shape legend: T tokens, D hidden size, E experts, K experts per token, X tasks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mtmoe.config import Config
from mtmoe.model.routers.base import Router, RouterOutput, RouterShape, register_router

SCORES = ("softmax", "sigmoid")


@dataclass(kw_only=True)
class TopKOptions:
    """Settings of the top-k router (`moe.router_options` with `moe.router: topk`).

    Attributes:
        score: `softmax` over the experts or `sigmoid` per expert (DeepSeek-V3).
        normalize: Renormalise the top-k gate weights to sum to one. With it, a freshly injected model
            (LoRA B factors at zero) computes exactly the base model.
        init_std: Standard deviation of the router's initial weights (a native block starts from the
            checkpoint's router instead).
        noise_std: Std of Gaussian noise on the router logits while training (noisy gating).
        aux_loss_coef: Weight of the load-balance auxiliary loss (mean over blocks) in the total loss.
        z_loss_coef: Weight of the router z-loss (mean of logsumexp(logits)², ST-MoE).
        balance_bias_rate: > 0 turns on auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias
            added to the scores to choose experts, moved by this much after every optimizer step toward
            the under-loaded experts. It is checkpointed.
        task_embedding: Add a learned task embedding to the router's input (task-aware routing).
        trainable: Train the router (false keeps it as initialised: a native checkpoint's own router).
    """

    score: str = "softmax"
    normalize: bool = True
    init_std: float = 0.02
    noise_std: float = 0.0
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    balance_bias_rate: float = 0.0
    task_embedding: bool = False
    trainable: bool = True

    def __post_init__(self) -> None:
        _check_score(self.score)
        for key in ("init_std", "noise_std", "aux_loss_coef", "z_loss_coef", "balance_bias_rate"):
            value = getattr(self, key)
            if value < 0:
                raise ValueError(f"config key 'moe.router_options.{key}': must be >= 0, got {value}")


@register_router("topk", TopKOptions)
class TopKRouter(Router):
    """Token-choice top-k router (the capacity is applied later, by the dispatch).

    Args:
        dim: Hidden size D.
        num_experts: Number of experts E.
        top_k: Experts per token K.
        normalize: Renormalise the K chosen weights to sum to one.
        init_std: Standard deviation of the initial router weights.
        score: `softmax` or `sigmoid`.
        noise_std: Std of the Gaussian noise added to the logits in training (0 = none).
        balance_bias: Keep an auxiliary-loss-free balancing bias (a checkpointed buffer, not trained by
            the optimizer).
        num_tasks: X > 0 adds a learned task embedding (X, D) to the router input (task-aware routing).
        allowed_XE: Optional bool mask: the experts a token of each task may choose.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        normalize: bool = True,
        init_std: float = 0.02,
        *,
        score: str = "softmax",
        noise_std: float = 0.0,
        balance_bias: bool = False,
        num_tasks: int = 0,
        allowed_XE: torch.Tensor | None = None,
    ):
        super().__init__()
        _check_score(score)
        self.num_experts, self.top_k, self.normalize = num_experts, top_k, normalize
        self.score, self.noise_std = score, noise_std
        self.weight_ED = nn.Parameter(torch.randn(num_experts, dim) * init_std)
        self.task_emb_XD = nn.Parameter(torch.zeros(num_tasks, dim)) if num_tasks else None
        if allowed_XE is not None:
            if not allowed_XE.is_meta and bool((allowed_XE.sum(1) < top_k).any()):
                raise ValueError("config key 'moe.task_experts': some task may choose < moe.top_k experts")
            self.register_buffer("allowed_XE", allowed_XE.bool(), persistent=False)
        else:
            self.allowed_XE = None
        self.balance_bias = balance_bias
        if balance_bias:
            self.register_buffer("bias_E", torch.zeros(num_experts))
            self.register_buffer("load_E", torch.zeros(num_experts, dtype=torch.float64), persistent=False)

    families = ("upcycled", "moefied", "native")

    @classmethod
    def from_options(cls, options: TopKOptions, shape: RouterShape) -> TopKRouter:
        """The router of one block (`Router.from_options`)."""
        router = cls(
            shape.dim,
            shape.num_experts,
            shape.top_k,
            options.normalize,
            options.init_std,
            score=options.score,
            noise_std=options.noise_std,
            balance_bias=options.balance_bias_rate > 0,
            num_tasks=shape.num_tasks if options.task_embedding else 0,
            allowed_XE=shape.allowed_XE,
        )
        router.weight_ED.requires_grad_(options.trainable)
        return router

    @classmethod
    def task_aware(cls, options: TopKOptions) -> bool:
        """With a task embedding."""
        return options.task_embedding

    @classmethod
    def loss_coefs(cls, options: TopKOptions) -> tuple[float, float]:
        """`aux_loss_coef` and `z_loss_coef`."""
        return options.aux_loss_coef, options.z_loss_coef

    @classmethod
    def check(cls, cfg: Config, options: TopKOptions) -> None:
        """A native block keeps its checkpoint's softmax scores; MoEfied top-k leaves some slice out."""
        if cfg.moe.family == "native" and options.score != "softmax":
            raise ValueError(
                "config key 'moe.router_options.score': a native MoE checkpoint's router scores with softmax"
            )
        if cfg.moe.family == "moefied" and cfg.moe.top_k >= cfg.moe.num_experts:
            raise ValueError(
                "config key 'moe.top_k': < moe.num_experts for a top-k MoEfied router "
                "(all slices: use moe.router=soft)"
            )

    def logits(self, x_TD: torch.Tensor, task_T: torch.Tensor | None = None) -> torch.Tensor:
        """Router logits in fp32 (before noise)."""
        # Routing runs in fp32: bf16 logits flip near-tied top-k choices between equivalent runs.
        w_ED = self.weight_ED.float()
        logits_TE = x_TD.float() @ w_ED.t()
        if self.task_emb_XD is not None and task_T is not None:
            logits_TE = logits_TE + (self.task_emb_XD.float() @ w_ED.t())[task_T]
        return logits_TE

    def forward(
        self, x_TD: torch.Tensor, valid_T: torch.Tensor | None = None, task_T: torch.Tensor | None = None
    ) -> RouterOutput:
        """Routes tokens.

        Args:
            x_TD: Token hidden states.
            valid_T: Bool mask of real (non-padding) tokens; only they count in the losses and the load.
            task_T: Task id of every token (for task embeddings and reserved experts).
        """
        logits_TE = self.logits(x_TD, task_T)
        if self.training and self.noise_std > 0:
            logits_TE = logits_TE + torch.randn_like(logits_TE) * self.noise_std
        z_loss = _masked_mean(torch.logsumexp(logits_TE, dim=-1).square(), valid_T)
        hidden_TE = None
        if self.allowed_XE is not None and task_T is not None:
            hidden_TE = ~self.allowed_XE[task_T]
            logits_TE = logits_TE.masked_fill(hidden_TE, float("-inf"))
        if self.score == "softmax":
            scores_TE = logits_TE.softmax(dim=-1)
            probs_TE = scores_TE
        else:
            scores_TE = torch.sigmoid(logits_TE)  # a hidden expert's score is sigmoid(-inf) = 0
            probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        choose_TE = scores_TE
        if self.balance_bias:
            choose_TE = scores_TE + self.bias_E
            if hidden_TE is not None:
                choose_TE = choose_TE.masked_fill(hidden_TE, float("-inf"))
        ids_TK = choose_TE.topk(self.top_k, dim=-1).indices
        top_TK = raw_TK = scores_TE.gather(1, ids_TK)
        if self.normalize:
            top_TK = top_TK / top_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        if self.balance_bias and self.training:
            real_TK = ids_TK if valid_T is None else ids_TK[valid_T]
            self.load_E += torch.bincount(real_TK.reshape(-1), minlength=self.num_experts).double()
        aux = load_balance_loss(probs_TE, ids_TK, valid_T)
        return RouterOutput(
            weights_TK=top_TK.to(x_TD.dtype), ids_TK=ids_TK, aux_loss=aux, z_loss=z_loss, scores_TK=raw_TK
        )


def _check_score(score: str) -> None:
    if score not in SCORES:
        raise ValueError(f"config key 'moe.router_options.score': expected {'|'.join(SCORES)}, got {score!r}")


def _masked_mean(v_T: torch.Tensor, valid_T: torch.Tensor | None) -> torch.Tensor:
    if valid_T is None:
        return v_T.mean()
    w_T = valid_T.to(v_T.dtype)
    return (v_T * w_T).sum() / w_T.sum().clamp_min(1.0)


def load_balance_loss(
    probs_TE: torch.Tensor, ids_TK: torch.Tensor, valid_T: torch.Tensor | None
) -> torch.Tensor:
    """E * sum_e f_e * P_e, with f_e the share of assignments and P_e the mean probability of expert e.

    Args:
        probs_TE: Router probabilities.
        ids_TK: Chosen experts.
        valid_T: Optional bool mask of tokens to count.
    """
    E = probs_TE.shape[-1]
    w_T = probs_TE.new_ones(probs_TE.shape[0]) if valid_T is None else valid_T.to(probs_TE.dtype)
    n = w_T.sum().clamp_min(1.0)
    assign_TE = torch.zeros_like(probs_TE).scatter_(1, ids_TK, 1.0)
    f_E = (assign_TE * w_T[:, None]).sum(0) / (n * ids_TK.shape[1])
    p_E = (probs_TE * w_T[:, None]).sum(0) / n
    return E * (f_E * p_E).sum()


@torch.no_grad()
def update_balance_biases(routers: list[TopKRouter], rate: float, all_reduce=None) -> None:
    """Auxiliary-loss-free balancing: b_e += rate · sign(mean load − load_e), then the loads restart.

    Args:
        routers: Routers with `balance_bias`.
        rate: The bias update speed u.
        all_reduce: Sums a tensor over data-parallel ranks (None = one process), so every rank moves its
            biases identically.
    """
    if not routers:
        return
    load_LE = torch.stack([r.load_E for r in routers])
    if all_reduce is not None:
        load_LE = all_reduce(load_LE)
    step_LE = torch.sign(load_LE.mean(dim=1, keepdim=True) - load_LE) * rate
    for r, step_E in zip(routers, step_LE, strict=True):
        r.bias_E += step_E.to(r.bias_E.dtype)
        r.load_E.zero_()
