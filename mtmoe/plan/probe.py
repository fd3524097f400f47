"""Measuring an MoE block's saved activations on real tiny blocks, and each layer's shape."""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mtmoe.config import Config
from mtmoe.model.block import MoELoRAFFN
from mtmoe.model.inject import inject_moe_lora
from mtmoe.model.lora import LoRALinear
from mtmoe.model.moe_lm import DTYPES, MoELM
from mtmoe.model.native import NativeMoELoRA
from mtmoe.model.walk import decoder_layers
from mtmoe.plan.meta import MoEfiedShapes, experts_per_block

FIT_TERMS = ("1", "T", "D", "F", "TD", "TF", "DF")


@dataclasses.dataclass
class BlockFit:
    """Saved bytes of one MoE block's forward, fitted over (T, D, F) from real tiny blocks.

    Attributes:
        coef: Bytes per term of `FIT_TERMS` (1, T, D, F, TD, TF, DF).
        residual: The largest misfit over the probes, in bytes (0 when the form is exact).
        probes: (T, D, F, measured bytes) of every probe.
    """

    coef: list[float]
    residual: float
    probes: list[tuple[int, int, int, int]]

    def __call__(self, T: int, D: int, F: int) -> float:
        """The fitted saved bytes at (T, D, F)."""
        return float(sum(c * t for c, t in zip(self.coef, _terms(T, D, F), strict=True)))


def _terms(T: int, D: int, F: int) -> list[float]:
    return [1.0, T, D, F, T * D, T * F, D * F]


def saved_bytes(fn: Callable[[], Any], exclude: set[int] = frozenset(), tag: Callable[[], Any] | None = None):
    """Runs `fn` and measures what autograd saves for backward.

    Args:
        fn: The forward to run.
        exclude: Storage addresses not to count (parameters).
        tag: Called on every new saved storage; its result keys the per-tag totals.

    Returns:
        (fn's result, total bytes of the unique saved storages, {tag: bytes}).
    """
    seen: dict[int, int] = {}
    by_tag: dict[Any, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr and ptr not in exclude and ptr not in seen:
            seen[ptr] = storage.nbytes()
            key = tag() if tag else None
            by_tag[key] = by_tag.get(key, 0) + storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values()), by_tag


def cast_params_(model: nn.Module, dtype: torch.dtype) -> None:
    """Casts every floating parameter to `dtype`, as DeepSpeed's engine does under bf16 (buffers stay)."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


def _probe_config(config: Any, D: int, F: int, E: int) -> Any:
    """A one-layer copy of the base's HF config at hidden size D and FFN (or expert) width F."""
    c = copy.deepcopy(config)
    c.hidden_size, c.num_hidden_layers, c.vocab_size = D, 1, 64
    c.num_attention_heads, c.num_key_value_heads, c.head_dim = 2, 1, D // 2
    if getattr(c, "layer_types", None) is not None:
        c.layer_types = c.layer_types[:1]
    if hasattr(c, "moe_intermediate_size"):  # Qwen2/3-MoE: expert width F, shared expert in proportion
        shared = getattr(c, "shared_expert_intermediate_size", 0) or 0
        ratio = shared / c.moe_intermediate_size if c.moe_intermediate_size else 0
        c.moe_intermediate_size = F
        if shared:
            c.shared_expert_intermediate_size = max(16, round(F * ratio / 16) * 16)
        c.mlp_only_layers, c.decoder_sparse_step = [], 1
    c.intermediate_size = F
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if getattr(c, key, None) is not None:
            setattr(c, key, 0)
    return c


def probe_block(
    cfg: Config,
    config: Any,
    task_names: list[str],
    padded: bool,
    input_grad: bool = True,
    router_only: bool = False,
) -> BlockFit:
    """Fits one MoE block's saved bytes from real tiny blocks of the recipe's family and options.

    Each probe builds a one-layer model from the base's config at width D and FFN width F, injects it as
    training does (experts all local), casts it as DeepSpeed would, and runs the block's forward on
    B = 1 × T tokens (the last one padding when `padded`).

    Args:
        cfg: The run config.
        config: The base's HF config.
        task_names: Task names (task routing and reserved experts need them).
        padded: Whether the probes' micro-batch holds a padding token.
        input_grad: Whether the block's input requires grad (not in a first layer without attention LoRA).
        router_only: Fit only the router's forward (the part the expert-parallel path shares).
    """
    from transformers import AutoModelForCausalLM

    dtype = DTYPES[cfg.model.dtype]
    E = experts_per_block(cfg, config, task_names)
    unit = 16 * E if cfg.moe.family == "moefied" else 32  # slices of f = F/E, 16-byte aligned rows
    moe = dataclasses.replace(cfg.moe, layers="all", attn_lora_rank=0)
    probes = []
    for D in (32, 64):
        for F in (unit, 2 * unit):
            with torch.random.fork_rng():  # the caller's random stream stays as it was
                torch.manual_seed(0)
                lm = AutoModelForCausalLM.from_config(_probe_config(config, D, F, E))
                context = inject_moe_lora(lm, moe, len(task_names), None, task_names)
                cast_params_(lm, dtype)
                block = decoder_layers(lm)[0].mlp.train()
                params = {p.untyped_storage().data_ptr() for p in lm.parameters()}
                for T in (16, 32, 48):
                    x = torch.randn(1, T, D, dtype=dtype, requires_grad=input_grad)
                    context.valid_T = torch.ones(T, dtype=torch.bool)
                    context.valid_T[-1] = not padded
                    context.task_T = torch.zeros(T, dtype=torch.long)
                    context.aux_losses = []
                    run = functools.partial(_probe_forward, block, x, router_only)
                    probes.append((T, D, F, saved_bytes(run, params)[1]))
    A = torch.tensor([_terms(T, D, F) for T, D, F, _ in probes], dtype=torch.float64)
    y = torch.tensor([p[3] for p in probes], dtype=torch.float64)
    coef = torch.linalg.lstsq(A, y[:, None]).solution[:, 0]
    residual = float((A @ coef - y).abs().max())
    return BlockFit(coef=coef.tolist(), residual=residual, probes=probes)


def _probe_forward(block: nn.Module, x_BSD: torch.Tensor, router_only: bool) -> Any:
    if router_only:
        ctx = block.context
        return block.router(x_BSD.reshape(-1, x_BSD.shape[-1]), ctx.valid_T, ctx.task_T)
    return block(x_BSD)


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """What one decoder layer saves for backward depends on (read from the meta model).

    Attributes:
        moe: Whether its FFN is an MoE block (else a frozen dense FFN).
        ffn: F: the dense FFN's width, or one expert's width in a native block.
        local: L, the block's experts on this rank.
        qkv_lora: Attention projections among q, k, v with LoRA.
        o_lora: Whether o_proj has LoRA.
        attn_rank: The attention LoRA rank.
        native: A native block (else upcycled or MoEfied).
        shared_ffn: Width of a native block's frozen shared expert (Qwen2-MoE), 0 if none.
        jitter: A native block with Mixtral's input jitter.
    """

    moe: bool
    ffn: int
    local: int = 0
    qkv_lora: int = 0
    o_lora: bool = False
    attn_rank: int = 0
    native: bool = False
    shared_ffn: int = 0
    jitter: bool = False


def layer_specs(model: MoELM) -> list[LayerSpec]:
    """The `LayerSpec` of every decoder layer of a (meta) model."""
    specs = []
    for layer in decoder_layers(model.lm):
        mlp, attn = layer.mlp, layer.self_attn
        lora = {n: m for n, m in attn.named_children() if isinstance(m, LoRALinear)}
        rank = next(iter(lora.values())).lora_a.shape[1] if lora else 0
        attn_kw = dict(qkv_lora=len(set(lora) & {"q_proj", "k_proj", "v_proj"}), o_lora="o_proj" in lora)
        if isinstance(mlp, NativeMoELoRA):
            shared = mlp.shared_expert.gate_proj.out_features if mlp.shared_expert is not None else 0
            spec = LayerSpec(
                moe=True,
                ffn=mlp.ffn_dim,
                local=mlp.experts.num_local,
                native=True,
                shared_ffn=shared,
                jitter=mlp.jitter_noise > 0,
                attn_rank=rank,
                **attn_kw,
            )
        elif isinstance(mlp, MoELoRAFFN):
            F = mlp.base.gate_proj.out_features
            spec = LayerSpec(moe=True, ffn=F, local=mlp.experts.num_local, attn_rank=rank, **attn_kw)
        elif isinstance(mlp, MoEfiedShapes):
            spec = LayerSpec(
                moe=True, ffn=mlp.perm_F.shape[0], local=mlp.num_experts, attn_rank=rank, **attn_kw
            )
        else:
            spec = LayerSpec(moe=False, ffn=mlp.gate_proj.out_features, attn_rank=rank, **attn_kw)
        specs.append(spec)
    return specs
