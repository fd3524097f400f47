"""Activation memory per rank: formulas for the frozen base, fitted bytes for the MoE blocks."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from mtmoe.config import Config
from mtmoe.model.fused_ce import chunk_rows
from mtmoe.model.moe_lm import MoELM
from mtmoe.model.routers import router_class
from mtmoe.plan.probe import FIT_TERMS, BlockFit, LayerSpec, layer_specs, probe_block
from mtmoe.plan.workload import Workload


@dataclasses.dataclass(frozen=True)
class Dims:
    """The sizes the activation formulas use (see the module's shape legend)."""

    B: int
    S: int
    D: int
    H: int
    Hk: int
    h: int
    V: int
    b: int
    K: int = 0
    R: int = 0
    padded: bool = False

    @property
    def T(self) -> int:  # noqa: N802 - the shape legend's T
        """Tokens per micro-batch."""
        return self.B * self.S


def base_dims(config: Any, cfg: Config, workload: Workload, micro_batch: int) -> Dims:
    """`Dims` of the base's HF config for this workload."""
    D, H = config.hidden_size, config.num_attention_heads
    K = int(getattr(config, "num_experts_per_tok", 0) or 0) if cfg.moe.family == "native" else cfg.moe.top_k
    if cfg.moe.family != "native" and router_class(cfg.moe.router).per_task:
        K = 0
    return Dims(
        B=micro_batch,
        S=workload.seq_len,
        D=D,
        H=H,
        Hk=getattr(config, "num_key_value_heads", None) or H,
        h=getattr(config, "head_dim", None) or D // H,
        V=config.vocab_size,
        b=2 if cfg.model.dtype == "bfloat16" else 4,
        K=K,
        R=cfg.moe.rank,
        padded=workload.padded,
    )


def ep_expert_bytes(spec: LayerSpec, d: Dims, N: int, M: int, input_grad: bool = True) -> dict[str, int]:
    """Saved bytes of a block's expert-parallel path beyond its router (tests/test_plan.py checks it).

    Read from the code. Upcycled (`MoELoRAFFN._remote_expert_outputs`): rows [x, W1x, W3x]
    (C_out = D + 2F) go out and [h, ΔW2 h] (C_back = F + D) come back. The owner keeps the received
    rows sorted by expert, the rank-R rows of the LoRA's gate, up and down, the SwiGLU's gate, act, up
    and product (4 × M × F) and the rows it sends back. The sender keeps the rows that came back and,
    for `combine`'s `index_add`, the gate-weighted rows again. With padding, the frozen FFN's masked
    path keeps W1x, act, W3x and their product (4 × T × F). Native (`NativeMoELoRA`): the same with
    [x] out and y back (C = D), plus Mixtral's jitter noise and Qwen2-MoE's frozen shared expert.
    Without `input_grad` (the block's input needs no gradient) the frozen paths keep only what the
    router's gradient needs.
    """
    T, D, F, R, L, b = d.T, d.D, spec.ffn, d.R, spec.local, d.b
    c_out, c_back = (D, D) if spec.native else (D + 2 * F, F + D)
    out = {
        "index": 8 * (2 * N + M) + T * d.K,
        "gate_weights": N * b,
        "lora_weights": L * R * (2 * D + F) * b,
        "received_rows": M * c_out * b,
        "lora_rows": 3 * M * R * b,
        "swiglu": 4 * M * F * b,
        "rows_sent_back": M * c_back * b,
        "rows_back_and_combined": 2 * N * c_back * b,
    }
    if spec.native and spec.jitter and input_grad:
        out["jitter"] = T * D * b
    if spec.native and spec.shared_ffn and input_grad:
        out["shared_expert"] = 3 * T * spec.shared_ffn * b + T * b + T * D * b
    if not spec.native and d.padded:
        out["padding_ffn"] = (4 if input_grad else 1) * T * F * b + T * b
    return out


def layer_activations(
    spec: LayerSpec, d: Dims, rg: bool, block: Callable[[LayerSpec, bool], float]
) -> tuple[dict[str, float], bool]:
    """Saved bytes of one decoder layer's forward, by part.

    The parts that need an input gradient save nothing until a trainable tensor comes before them:
    the first layer's norm and attention save nothing unless it has attention LoRA.

    Args:
        spec: The layer.
        d: Sizes.
        rg: Whether the layer's input requires grad.
        block: Saved bytes of the layer's MoE block, given whether its input requires grad.

    Returns:
        ({part: bytes}, whether the layer's output requires grad).
    """
    T, D, b = d.T, d.D, d.b
    out: dict[str, float] = {}
    norm = T * D * 4 + T * 4  # RMSNorm keeps its fp32 input and 1/rms
    if rg:
        out["input_norm"] = norm
    qkv_rg = rg or spec.qkv_lora > 0
    if spec.qkv_lora:
        out["attn_lora"] = T * D * b + spec.qkv_lora * T * spec.attn_rank * b
    if spec.o_lora:  # its input is SDPA's output, already kept when q, k, v need gradients
        out["attn_lora"] = (
            out.get("attn_lora", 0) + T * spec.attn_rank * b + (0 if qkv_rg else T * d.H * d.h * b)
        )
    if qkv_rg:  # SDPA keeps q, k, v, its output and the log-sum-exp
        kv_heads = d.H if d.padded else d.Hk  # with a mask, HF repeats k and v to H heads for SDPA
        out["attention"] = 2 * T * d.H * d.h * b + 2 * T * kv_heads * d.h * b + d.B * d.H * d.S * 4
        if d.padded:  # SDPA turns the boolean mask into an additive one of the query's dtype, per call
            out["attention_mask"] = d.B * d.S * d.S * b
    mlp_rg = qkv_rg or spec.o_lora
    if mlp_rg:
        out["post_norm"] = norm
    if spec.moe:
        out["moe_block"] = block(spec, mlp_rg)
    elif mlp_rg:
        out["dense_ffn"] = 3 * T * spec.ffn * b
    return out, mlp_rg or spec.moe


def head_activations(d: Dims, X: int) -> dict[str, float]:
    """Saved bytes outside the layers: final norm, target indices, the fused loss's gradient, rotary tables.

    The fused, chunked cross-entropy (`mtmoe.model.fused_ce`) keeps the X×D gradient to the targets'
    hidden states, not their X×V log-probabilities.
    """
    T, b = d.T, d.b
    out = {
        "final_norm": T * d.D * 4 + T * 4,
        "fused_ce_grad": X * d.D * b,
        "target_index": 32 * X,
        "rotary": 2 * d.S * d.h * b,
    }
    return out


def activation_plan(
    model: MoELM, cfg: Config, config: Any, workload: Workload, task_names: list[str]
) -> dict[str, Any]:
    """Saved activations of one micro-batch per rank, with and without gradient checkpointing.

    Returns:
        {"layers": [{part: bytes}], "head": {part: bytes}, "no_checkpointing": total,
        "checkpointing": {"stored", "recompute", "total"}, "workspace": bytes, "block_fits": {...}, ...}.
    """
    B = cfg.train.micro_batch_size
    d = base_dims(config, cfg, workload, B)
    T = d.T
    real = T - 1 if workload.padded else T
    N = real * d.K
    X = max(1, round(B * (d.S - 1) * workload.target_frac) - (1 if workload.padded else 0))
    ep = cfg.parallel.ep_size
    fits: dict[bool, BlockFit] = {}
    specs = layer_specs(model)

    def block(spec: LayerSpec, input_grad: bool) -> float:
        if input_grad not in fits:
            fits[input_grad] = probe_block(cfg, config, task_names, d.padded, input_grad, router_only=ep > 1)
        saved = fits[input_grad](T, d.D, spec.ffn)
        return saved if ep == 1 else saved + sum(ep_expert_bytes(spec, d, N, N, input_grad).values())

    layers, rg = [], False
    for spec in specs:
        parts, rg = layer_activations(spec, d, rg, block)
        layers.append(parts)
    head = head_activations(d, X)
    per_layer = [sum(p.values()) for p in layers]
    # Checkpointing keeps each layer's input (and the rotary tables, which the recomputation reuses).
    stored = len(specs) * T * d.D * d.b + sum(head.values())
    # One chunk of the fused loss: its fp32 logits, and in bf16 the matmul's output and the probabilities'
    # cast back for the gradient.
    chunk = min(X, chunk_rows(d.V))
    workspace = chunk * d.V * (4 + (2 * d.b if d.b != 4 else 0))
    return {
        "micro_batch": B,
        "seq_len": d.S,
        "tokens": T,
        "dims": dataclasses.asdict(d),
        "assignments": N,
        "targets": X,
        "layers": layers,
        "head": head,
        "no_checkpointing": sum(per_layer) + sum(head.values()),
        "checkpointing": {"stored": stored, "recompute": max(per_layer), "total": stored + max(per_layer)},
        "workspace": workspace,
        "block_fits": {
            "terms": list(FIT_TERMS),
            "router_only": ep > 1,
            **{
                ("input_grad" if g else "no_input_grad"): {"coef": f.coef, "residual": f.residual}
                for g, f in fits.items()
            },
        },
    }
