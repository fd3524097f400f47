"""Plans a run's memory and traffic per rank from its recipe, without loading or allocating any weights.

How each number is found:
- **Parameters.** The model is built on the meta device exactly as training builds it for rank 0: the
  base from its config, then `inject_moe_lora` with `ExpertPlacement(E, ep_size, ep_rank=0)` (made
  directly, no process group). Under bf16, DeepSpeed casts every parameter to bf16, trainable LoRA
  included, so that is what is counted. MoEfied blocks cannot be built on meta (their balanced k-means
  needs real weights); `MoEfiedShapes` stands in for them with the same tensors.
- **ZeRO.** The optimizer groups are `mtmoe.parallel.engine.param_groups` of the meta model. As in
  DeepSpeed's `stage_1_and_2.py`, a group is flattened, padded to 2·P elements and cut into P partitions,
  where P is the data-parallel world for dense groups and the expert-data-parallel group (world / ep_size)
  for expert groups. Each rank keeps an fp32 master copy of its partitions (a clone, in fp32 too), AdamW's
  two fp32 moments, its gradient partition (ZeRO-2) or every gradient (ZeRO-0/1) in the model dtype,
  and a contiguous reduce bucket of `reduce_bucket_size` elements during backward.
- **Activations** are the tensors autograd saves for backward, per micro-batch of B × S tokens. The frozen
  base (norms, attention, dense FFNs, the LM head's log-softmax) follows formulas read from the HF code.
  Each MoE block is measured: a real block of the same family and options, at a few tiny widths, runs
  a forward under `saved_tensors_hooks`, and the saved bytes are fitted exactly as
  c₀ + c₁T + c₂D + c₃F + c₄TD + c₅TF + c₆DF (`BlockFit`). The fit follows the block code as it
  changes; the expert-parallel path, which needs a process group, uses its own formula
  (`ep_expert_bytes`). `measure` checks the whole plan against a real model (tests/test_plan.py).
- **Traffic** per rank and step: the gradient reduction of the ZeRO stage, and the expert-parallel
  all-to-alls: rows [x, W1x, W3x] out and [h, ΔW2 h] back per assignment (upcycled), [x] out and y back
  (native), each way again in backward, and once more with gradient checkpointing (the recomputed forward).

Shape legend: B micro-batch, S sequence length, T = B·S tokens, D hidden size, F FFN (expert) width,
H heads, Hk key/value heads, h head dim, E experts of a block, L experts on this rank, K experts per
token, R LoRA rank, N = K·(real tokens) assignments a rank routes, M rows its experts receive (N on
average), V vocabulary, X target tokens, b bytes per element of the model dtype.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import resource
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtmoe.config import Config, MoEConfig
from mtmoe.model.base import SMOLLM2_ALIAS
from mtmoe.model.block import MoELoRAFFN
from mtmoe.model.experts import UpcycledLoRAExperts
from mtmoe.model.frozen_store import store_frozen_
from mtmoe.model.fused_ce import chunk_rows
from mtmoe.model.inject import build_router, decoder_layers, inject_moe_lora, moe_blocks
from mtmoe.model.lora import LoRALinear
from mtmoe.model.moe_base import MoEBlock, RoutingContext
from mtmoe.model.moe_lm import DTYPES, TINY_MOE, MoELM, block_num_experts, build_base
from mtmoe.parallel.expert_parallel import ExpertPlacement, check_ep_size, is_expert_param

GIB = 1024**3
MODEL_CONFIGS = Path(__file__).resolve().parents[2] / "launch" / "model_configs"
DS_REDUCE_BUCKET = 500_000_000  # DeepSpeed's default zero_optimization.reduce_bucket_size (elements)
FIT_TERMS = ("1", "T", "D", "F", "TD", "TF", "DF")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Workload:
    """What the plan is for, beyond the recipe.

    Attributes:
        world: Ranks in the job (GPUs).
        seq_len: S, tokens per sequence (the collator pads each micro-batch to its longest row).
        target_frac: Share of the positions that carry loss (1 = every position but the first).
        padded: Assume micro-batches with padding: the attention mask is materialised and, for
            upcycled blocks, padding tokens keep the frozen FFN through a second, masked path.
        gpu_mem_gib: Memory of one GPU.
        reserve_gib: Set aside for the CUDA context, NCCL and kernels' workspaces.
        frag: Share of the rest lost to allocator fragmentation.
        num_tasks: Tasks, when no task names are given (task-routing tables, counters).
    """

    world: int = 1
    seq_len: int = 2048
    target_frac: float = 1.0
    padded: bool = True
    gpu_mem_gib: float = 80.0
    reserve_gib: float = 1.5
    frag: float = 0.10
    num_tasks: int = 1

    @property
    def usable_bytes(self) -> float:
        """GPU memory a plan may fill: (gpu − reserve) · (1 − frag)."""
        return (self.gpu_mem_gib - self.reserve_gib) * (1 - self.frag) * GIB


# --------------------------------------------------------------------------------------------- the model


def base_folder(name: str) -> Path:
    """The HF folder whose config.json describes `model.base` (the demo alias maps to a shipped config).

    Raises:
        ValueError: Naming `model.base` if there is no config.json.
    """
    path = MODEL_CONFIGS / SMOLLM2_ALIAS if name == SMOLLM2_ALIAS else Path(name)
    if not (path / "config.json").is_file():
        raise ValueError(f"config key 'model.base': {name!r} has no config.json to plan from")
    return path


def meta_base(cfg: Config, vocab_size: int) -> nn.Module:
    """The frozen base on the meta device: no weights are read and no memory is taken."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        if cfg.model.base == "tiny-llama" or cfg.model.base in TINY_MOE:
            return build_base(cfg, vocab_size)
        config = AutoConfig.from_pretrained(base_folder(cfg.model.base))
        return AutoModelForCausalLM.from_config(config, dtype=DTYPES[cfg.model.dtype])


def experts_per_block(cfg: Config, config: Any, task_names: list[str]) -> int:
    """E of every MoE block: the checkpoint's for native models, else the recipe's (with reserved ones)."""
    if cfg.moe.family == "native":
        return int(getattr(config, "num_local_experts", None) or config.num_experts)
    return block_num_experts(cfg, task_names)


class MoEfiedShapes(MoEBlock):
    """Stands in for `MoEfiedFFN` where it cannot be built (the meta device: k-means needs real weights).

    It holds the same parameters and buffers under the same names, shapes, dtypes and trainability, and
    computes nothing.

    Args:
        mlp: The dense SwiGLU FFN it replaces.
        cfg: The MoE section of the config.
        context: The model's routing context.
        num_tasks: Tasks (for the router's task embeddings).
    """

    def __init__(self, mlp: nn.Module, cfg: MoEConfig, context: RoutingContext, num_tasks: int):
        E = cfg.num_experts
        super().__init__(E, context)
        D, F = mlp.gate_proj.in_features, mlp.gate_proj.out_features
        if F % E:
            raise ValueError(f"config key 'moe.num_experts': {E} does not divide FFN width {F}")
        f, dt = F // E, mlp.gate_proj.weight.dtype
        self.register_buffer("perm_F", torch.empty(F, dtype=torch.long))
        for name, shape in (("gate_EDf", (E, D, f)), ("up_EDf", (E, D, f)), ("down_EfD", (E, f, D))):
            setattr(self, name, nn.Parameter(torch.empty(shape, dtype=dt), requires_grad=False))
        self.experts = UpcycledLoRAExperts(E, D, f, cfg.rank, cfg.alpha)
        if cfg.router == "soft":
            from mtmoe.model.moefied import SoftSliceRouter

            self.router = SoftSliceRouter(D, E, cfg.soft_tau)
        else:
            self.router = build_router(cfg, D, E, num_tasks)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:  # pragma: no cover - never called
        """Refuses: a stand-in for counting only."""
        raise RuntimeError("MoEfiedShapes only describes a MoEfied block's tensors")


def meta_model(cfg: Config, vocab_size: int, task_names: list[str], world: int = 1) -> MoELM:
    """The model that training builds on rank 0, on the meta device.

    Raises:
        ValueError: Naming `parallel.ep_size` if it divides neither the experts nor the world.
    """
    lm = meta_base(cfg, vocab_size)
    E = experts_per_block(cfg, lm.config, task_names)
    check_ep_size(cfg.parallel.ep_size, E, world)
    placement = ExpertPlacement(E, cfg.parallel.ep_size, 0)
    moe = cfg.moe if cfg.moe.family != "moefied" else dataclasses.replace(cfg.moe, family="upcycled")
    # Reserved experts: TopKRouter checks its (task, expert) mask with .item(), which meta tensors refuse,
    # so the new LoRA and router tensors are then made on the CPU (the frozen base stays on meta).
    where = torch.device("cpu" if cfg.moe.task_experts else "meta")
    with where:
        context = inject_moe_lora(lm, moe, len(task_names), placement, task_names)
        if cfg.moe.family == "moefied":
            for layer in decoder_layers(lm):
                if isinstance(layer.mlp, MoELoRAFFN):
                    layer.mlp = MoEfiedShapes(layer.mlp.base, cfg.moe, context, len(task_names))
    if cfg.model.frozen_dtype:
        store_frozen_(lm, DTYPES[cfg.model.frozen_dtype], DTYPES[cfg.model.dtype])
    return MoELM(lm, context)


# ------------------------------------------------------------------------------- parameters and ZeRO


def count_parameters(model: nn.Module, dtype: torch.dtype) -> dict[str, dict[str, int]]:
    """Elements and bytes of this rank's parameters, frozen/trainable × dense/expert, and of its buffers.

    Floating parameters count in `dtype` (DeepSpeed casts every parameter to bf16 under bf16), or in
    their own dtype where that is narrower (a frozen base stored in bf16 under fp32, `model.frozen_dtype`).
    """
    out = {f"{a}_{b}": {"numel": 0, "bytes": 0} for a in ("frozen", "trainable") for b in ("dense", "expert")}
    size = torch.empty((), dtype=dtype, device="meta").element_size()
    for p in model.parameters():
        key = f"{'trainable' if p.requires_grad else 'frozen'}_{'expert' if is_expert_param(p) else 'dense'}"
        out[key]["numel"] += p.numel()
        stored = min(size, p.element_size()) if p.is_floating_point() else p.element_size()
        out[key]["bytes"] += p.numel() * stored
    buffers = {"numel": 0, "bytes": 0}
    for t in model.buffers():
        buffers["numel"] += t.numel()
        buffers["bytes"] += t.numel() * t.element_size()
    out["buffers"] = buffers
    return out


def zero_groups(model: nn.Module, cfg: Config, world: int) -> list[dict[str, Any]]:
    """The optimizer's groups as DeepSpeed partitions them on this rank.

    Returns:
        Per group: name, `expert`, numel, `partitions` (P), `aligned` (numel padded to 2·P) and
        `partition` (aligned / P, this rank's share).
    """
    from mtmoe.parallel.engine import param_groups

    groups = []
    for g in param_groups(model, cfg.train.weight_decay):
        expert = bool(g.get("moe"))
        P = world // cfg.parallel.ep_size if expert else world
        numel = sum(p.numel() for p in g["params"])
        aligned = math.ceil(numel / (2 * P)) * 2 * P
        groups.append(
            {
                "name": g["name"],
                "expert": expert,
                "numel": numel,
                "partitions": P,
                "aligned": aligned,
                "partition": aligned // P,
            }
        )
    return groups


def optimizer_memory(groups: list[dict[str, Any]], cfg: Config, world: int) -> dict[str, float]:
    """Bytes of the trainable tensors' copies that the ZeRO stage keeps, and its transient buffers.

    Returns:
        trainable (model-dtype params, flat and padded under ZeRO-1/2), master (fp32), adam (two fp32
        moments), grads (model dtype, held through backward), bucket (ZeRO's contiguous reduce bucket in
        backward), step_grads_fp32 (the fp32 gradient the step reads) and step_workspace (AdamW's
        foreach temporaries).
    """
    from mtmoe.parallel.ds_config import build_ds_config

    stage, b = cfg.parallel.zero_stage, 2 if cfg.model.dtype == "bfloat16" else 4
    n = sum(g["numel"] for g in groups)
    part = sum(g["partition"] for g in groups) if stage else n
    zero = build_ds_config(cfg, world)["zero_optimization"]
    buckets = 2 if zero.get("overlap_comm", False) else 1
    bucket = int(zero.get("reduce_bucket_size", DS_REDUCE_BUCKET)) * b * buckets
    return {
        "trainable": (sum(g["aligned"] for g in groups) if stage else n) * b,
        "master": part * 4 if stage or b != 4 else 0,
        "adam": 2 * part * 4,
        "grads": (part if stage == 2 else n) * b,
        "bucket": bucket if stage and zero.get("contiguous_gradients", True) else 0,
        "step_grads_fp32": part * 4 if b != 4 else 0,
        "step_workspace": part * 4,
    }


# --------------------------------------------------------------------------------------- activations


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
    from mtmoe.model.native import NativeMoELoRA

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
    if cfg.moe.family != "native" and cfg.moe.task_routing == "gate":
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


# ------------------------------------------------------------------------------------------ traffic


def traffic_plan(
    cfg: Config, groups: list[dict[str, Any]], N: int, D: int, specs: list[LayerSpec]
) -> dict[str, Any]:
    """Bytes moved per rank and optimizer step.

    `payload` is the tensor bytes handed to the collective; `wire` is what a ring algorithm sends per
    rank: 2(P−1)/P of the payload for an all-reduce, (P−1)/P for a reduce-scatter, an all-gather, or the
    all-to-all share that leaves the rank under even routing.
    """
    b = 2 if cfg.model.dtype == "bfloat16" else 4
    stage, accum, ep = cfg.parallel.zero_stage, cfg.train.grad_accum, cfg.parallel.ep_size
    out: dict[str, Any] = {"collectives": []}

    def add(name: str, payload: float, P: int, factor: float, times: int) -> None:
        share = (P - 1) / P if P > 1 else 0.0
        out["collectives"].append(
            {
                "what": name,
                "group": P,
                "times": times,
                "payload": payload * times,
                "wire": payload * times * share * factor,
            }
        )

    for expert in (False, True):
        gs = [g for g in groups if g["expert"] == expert]
        if not gs:
            continue
        P, numel = gs[0]["partitions"], sum(g["numel"] for g in gs)
        kind = "expert" if expert else "dense"
        if stage == 0:
            add(f"all-reduce {kind} grads", numel * b, P, 2, 1)
        else:
            add(f"reduce-scatter {kind} grads", numel * b, P, 1, accum if stage == 2 else 1)
            add(f"all-gather {kind} params", numel * b, P, 1, 1)
    if ep > 1:
        passes = 3 if cfg.model.gradient_checkpointing else 2  # forward, backward, recomputed forward
        for spec in specs:
            if not spec.moe:
                continue
            F = spec.ffn
            sent, back = (D, D) if spec.native else (D + 2 * F, F + D)
            add("all-to-all rows out", N * sent * b, ep, 1, accum * passes)
            add("all-to-all rows back", N * back * b, ep, 1, accum * passes)
    merged: dict[str, dict[str, Any]] = {}
    for c in out["collectives"]:
        m = merged.setdefault(c["what"], {**c, "payload": 0.0, "wire": 0.0, "times": 0})
        m["payload"] += c["payload"]
        m["wire"] += c["wire"]
        m["times"] += c["times"]
    out["collectives"] = list(merged.values())
    out["payload"] = sum(c["payload"] for c in out["collectives"])
    out["wire"] = sum(c["wire"] for c in out["collectives"])
    return out


# --------------------------------------------------------------------------------------------- plan


def plan(
    cfg: Config, workload: Workload, vocab_size: int | None = None, task_names: list[str] | None = None
) -> dict[str, Any]:
    """The per-rank memory and traffic plan of a run (JSON-ready).

    Args:
        cfg: The run config.
        workload: World size, sequence length and GPU.
        vocab_size: For the tiny bases (whose vocabulary follows the tokenizer); default 49152.
        task_names: The manifest's tasks in id order (default: `workload.num_tasks` anonymous tasks).

    Raises:
        ValueError: For an `ep_size` that divides neither the experts nor the world (naming it).
    """
    task_names = task_names or [f"task{i}" for i in range(workload.num_tasks)]
    model = meta_model(cfg, vocab_size or 49152, task_names, workload.world)
    config = model.lm.config
    dtype = DTYPES[cfg.model.dtype]
    params = count_parameters(model, dtype)
    groups = zero_groups(model, cfg, workload.world)
    opt = optimizer_memory(groups, cfg, workload.world)
    acts = activation_plan(model, cfg, config, workload, task_names)
    specs = layer_specs(model)
    traffic = traffic_plan(cfg, groups, acts["assignments"], config.hidden_size, specs)

    frozen = params["frozen_dense"]["bytes"] + params["frozen_expert"]["bytes"]
    n_trainable = params["trainable_dense"]["numel"] + params["trainable_expert"]["numel"]
    qr = (1 + len(task_names)) * n_trainable * 4 if cfg.balance.quality_retain else 0
    gc = cfg.model.gradient_checkpointing
    act = acts["checkpointing"]["total"] if gc else acts["no_checkpointing"]
    persistent = frozen + params["buffers"]["bytes"] + opt["trainable"] + opt["master"] + opt["adam"] + qr
    backward = act + acts["workspace"] + opt["grads"] + opt["bucket"]
    step = opt["grads"] + opt["step_grads_fp32"] + opt["step_workspace"]
    peak = persistent + max(backward, step)
    blocks = moe_blocks(model.lm)
    first = next(iter(blocks.values()), None)
    return {
        "recipe": {
            "base": cfg.model.base,
            "family": cfg.moe.family,
            "dtype": cfg.model.dtype,
            "zero_stage": cfg.parallel.zero_stage,
            "ep_size": cfg.parallel.ep_size,
            "gradient_checkpointing": gc,
            "micro_batch_size": cfg.train.micro_batch_size,
            "grad_accum": cfg.train.grad_accum,
        },
        "workload": dataclasses.asdict(workload),
        "model": {
            "architecture": type(model.lm).__name__,
            "layers": len(specs),
            "moe_layers": sum(s.moe for s in specs),
            "hidden": config.hidden_size,
            "experts": first.num_experts if first is not None else 0,
            "experts_per_rank": _local_experts(first),
            "vocab": config.vocab_size,
        },
        "parameters": params,
        "zero_groups": groups,
        "optimizer": opt,
        "quality_retain": qr,
        "activations": acts,
        "traffic": traffic,
        "memory": {
            "persistent": persistent,
            "activations": act,
            "backward_phase": backward,
            "step_phase": step,
            "peak": peak,
            "usable": workload.usable_bytes,
            "fits": peak <= workload.usable_bytes,
        },
    }


def _local_experts(block: nn.Module | None) -> int:
    if block is None:
        return 0
    experts = getattr(block, "experts", None)
    return experts.num_local if experts is not None else block.num_experts


def manifest_facts(cfg: Config) -> dict[str, Any]:
    """Vocabulary size, row length and task names from `data.tokenized`'s manifest (None where absent)."""
    path = Path(cfg.data.tokenized) / "manifest.json"
    if not path.is_file():
        return {"vocab_size": None, "max_len": None, "task_names": None}
    from mtmoe.data.shards import load_manifest

    manifest = load_manifest(path.parent)
    return {
        "vocab_size": manifest.vocab_size,
        "max_len": manifest.max_len,
        "task_names": [t.name for t in manifest.tasks],
    }


# ------------------------------------------------------------------------------------------ measure


def measure(
    cfg: Config,
    seq_len: int,
    vocab_size: int,
    task_names: list[str],
    padded: bool = True,
    placement: ExpertPlacement | None = None,
) -> dict[str, Any]:
    """Measures one real training step of the model in this process (CPU), for checking a plan.

    Builds the real model (its weights: the cached demo model, or a tiny random one), casts it as
    DeepSpeed would, and runs one micro-batch of `train.micro_batch_size` × `seq_len` random tokens
    (every position a target, the last token padding when `padded`) forward, backward and through a
    `torch.optim.AdamW` step (on fp32 masters under bf16, as DeepSpeed).

    Args:
        cfg: The run config.
        seq_len: S.
        vocab_size: For the tiny bases.
        task_names: The tasks.
        padded: Whether the micro-batch holds a padding token.
        placement: This rank's experts (default: all; an expert-parallel one needs its process group).

    Returns:
        Bytes of: parameters (frozen, trainable), gradients after backward, AdamW state after the step,
        the saved activations (total, per layer, outside the layers; with gradient checkpointing: what
        the forward stores plus the largest layer's recomputed set), and the growth of the peak RSS.
    """
    from mtmoe.model.moe_lm import build_model

    torch.manual_seed(cfg.train.seed)
    dtype = DTYPES[cfg.model.dtype]
    placement = placement or ExpertPlacement(block_num_experts(cfg, task_names))
    model = build_model(cfg, vocab_size, len(task_names), placement, task_names)
    if dtype != torch.float32:  # DeepSpeed casts under bf16 only; an fp32 run keeps a narrower frozen base
        cast_params_(model, dtype)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    out: dict[str, Any] = {
        "frozen": sum(p.numel() * p.element_size() for p in frozen),
        "trainable": sum(p.numel() * p.element_size() for p in trainable),
    }
    B = cfg.train.micro_batch_size
    gen = torch.Generator().manual_seed(0)
    ids_BS = torch.randint(0, vocab_size, (B, seq_len), generator=gen)
    mask_BS = torch.ones(B, seq_len, dtype=torch.long)
    if padded:
        mask_BS[-1, -1] = 0
    task_B = torch.zeros(B, dtype=torch.long)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    layers = decoder_layers(model.lm)
    where = {"layer": "head"}
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda m, a, i=i: where.update(layer=i))
        layer.register_forward_hook(lambda m, a, o: where.update(layer="head"))

    def forward():
        return model(ids_BS, mask_BS, mask_BS, task_B)

    gc = cfg.model.gradient_checkpointing
    if gc:  # the per-layer sets without checkpointing: what each layer's recomputation saves
        model.lm.gradient_checkpointing_disable()
        _, _, by_layer = saved_bytes(forward, params, lambda: where["layer"])
        model.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    (loss_BS, aux), total, tagged = saved_bytes(forward, params, lambda: where["layer"])
    if not gc:
        by_layer = tagged
    per_layer = [by_layer.get(i, 0) for i in range(len(layers))]
    out["activations"] = total + (max(per_layer) if gc else 0)
    out["activations_stored"] = total
    out["activations_per_layer"] = per_layer
    out["activations_head"] = by_layer.get("head", 0)
    if gc:  # MoELM.forward clears the routing context, which the recomputed forward still reads
        model.context.valid_T = mask_BS.reshape(-1).bool()
        model.context.task_T = task_B[:, None].expand_as(ids_BS).reshape(-1)
    loss = loss_BS.sum() / max(1, int((loss_BS != 0).sum())) + aux
    loss.backward()
    out["grads"] = sum(p.grad.numel() * p.grad.element_size() for p in trainable if p.grad is not None)
    masters = trainable
    if dtype != torch.float32:  # as DeepSpeed: the step updates fp32 masters of the bf16 parameters
        masters = [p.detach().float().requires_grad_() for p in trainable]
        for m, p in zip(masters, trainable, strict=True):
            m.grad = None if p.grad is None else p.grad.float()
    opt = torch.optim.AdamW(masters, lr=1e-4)
    opt.step()
    out["optimizer"] = sum(
        t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t)
    ) + (0 if masters is trainable else sum(m.numel() * 4 for m in masters))
    out["rss_growth"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
    out["total"] = out["frozen"] + out["trainable"] + out["grads"] + out["optimizer"] + out["activations"]
    return out


def check_here(
    cfg: Config, workload: Workload, vocab_size: int | None = None, task_names: list[str] | None = None
) -> dict[str, dict[str, float]]:
    """Plans `cfg` at world 1 with ZeRO-0 and measures one real step of it in this process.

    Returns:
        {"planned": `comparable(...)`, "measured": `measure(...)`}, in bytes.
    """
    task_names = task_names or [f"task{i}" for i in range(workload.num_tasks)]
    one = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, zero_stage=0))
    planned = comparable(plan(one, dataclasses.replace(workload, world=1), vocab_size, task_names))
    measured = measure(one, workload.seq_len, vocab_size or 49152, task_names, workload.padded)
    return {"planned": planned, "measured": measured}


def comparable(p: dict[str, Any]) -> dict[str, float]:
    """The planned counterparts of `measure`'s numbers (plan it at world 1 with ZeRO-0)."""
    params, opt = p["parameters"], p["optimizer"]
    acts = p["activations"]
    gc = p["recipe"]["gradient_checkpointing"]
    out = {
        "frozen": params["frozen_dense"]["bytes"] + params["frozen_expert"]["bytes"],
        "trainable": opt["trainable"],
        "grads": opt["grads"],
        "optimizer": opt["adam"] + opt["master"],
        "activations": acts["checkpointing"]["total"] if gc else acts["no_checkpointing"],
    }
    out["total"] = sum(out.values())
    return out


# ------------------------------------------------------------------------------------------- report


def _unit(nbytes: float) -> tuple[str, float]:
    return ("GiB", GIB) if nbytes >= GIB else ("MiB", 2**20)


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(int(n))


def _formula(coef: list[float], terms: list[str]) -> str:
    """`c₀ + c₁T + …` with the zero terms left out, e.g. `8 TF + 6 TD + 612 T − 188`."""
    parts = [(round(c), t) for c, t in zip(coef, terms, strict=True) if round(c)]
    parts.sort(key=lambda p: -len(p[1]) if p[1] != "1" else 1)
    text = " ".join(f"{'-' if c < 0 else '+'} {abs(c)}{'' if t == '1' else ' ' + t}" for c, t in parts)
    return text.removeprefix("+ ") or "0"


def format_plan(p: dict[str, Any]) -> str:
    """The plan as a readable table (GiB per rank; MiB for plans under 1 GiB)."""
    r, w, m, mem = p["recipe"], p["workload"], p["model"], p["memory"]
    unit, scale = _unit(mem["peak"])

    def _gib(n: float) -> str:
        return f"{n / scale:.3f}"

    acts, opt, params = p["activations"], p["optimizer"], p["parameters"]
    ep, world, dt = r["ep_size"], w["world"], "bf16" if r["dtype"] == "bfloat16" else "fp32"
    gc = r["gradient_checkpointing"]
    lines = [
        f"model: {m['architecture']} ({r['base']}), {m['layers']} layers, {m['moe_layers']} of them MoE, "
        f"hidden {m['hidden']}, vocab {m['vocab']}; {r['family']} experts: {m['experts']} per block, "
        f"{m['experts_per_rank']} per rank",
        f"run: world {world}, ep_size {ep} (expert-data-parallel {world // ep}), ZeRO-{r['zero_stage']}, "
        f"{r['dtype']}, micro-batch {acts['micro_batch']} × {acts['seq_len']} tokens"
        f"{' with padding' if w['padded'] else ''}, grad_accum {r['grad_accum']}, gradient checkpointing "
        f"{'on' if gc else 'off'}",
        "",
        f"{'per rank':<44}{'elements':>11}{unit:>10}",
    ]

    def row(name: str, nbytes: float, numel: float | None = None) -> None:
        lines.append(f"  {name:<42}{_count(numel) if numel is not None else '':>11}{_gib(nbytes):>10}")

    for key, name in (
        ("frozen_dense", f"frozen, {dt}"),
        ("frozen_expert", f"frozen experts, {dt}"),
        ("trainable_dense", f"trainable: routers, attn LoRA, {dt}"),
        ("trainable_expert", f"trainable: expert LoRA, {dt}"),
    ):
        if params[key]["numel"]:
            row(name, params[key]["bytes"], params[key]["numel"])
    row("buffers", params["buffers"]["bytes"], params["buffers"]["numel"])
    share = f" (1/{world} dense, 1/{world // ep} expert)" if r["zero_stage"] else ""
    if opt["master"]:
        row(f"fp32 master{share}", opt["master"])
    row(f"AdamW moments, fp32{share}", opt["adam"])
    if p["quality_retain"]:
        row("Quality Retaining EMA + teachers, fp32", p["quality_retain"])
    row(f"gradients, {dt}" + (" (own partition)" if r["zero_stage"] == 2 else ""), opt["grads"])
    if opt["bucket"]:
        row("ZeRO reduce bucket (backward)", opt["bucket"])
    row("activations, no checkpointing" + ("" if gc else " *"), acts["no_checkpointing"])
    row("activations, checkpointing" + (" *" if gc else ""), acts["checkpointing"]["total"])
    row("LM-head logits, one chunk (transient)", acts["workspace"])
    if opt["step_grads_fp32"] or opt["step_workspace"]:
        row("step: fp32 grads, AdamW temporaries", opt["step_grads_fp32"] + opt["step_workspace"])
    lines.append(f"  {'-' * 63}")
    row("persistent: parameters, optimizer state", mem["persistent"])
    row("+ the larger of backward and step", max(mem["backward_phase"], mem["step_phase"]))
    row("planned peak", mem["peak"])
    verdict = "fits" if mem["fits"] else "DOES NOT FIT"
    lines += [
        f"  {verdict} in {w['gpu_mem_gib']:g} GiB: {mem['usable'] / GIB:.1f} GiB usable "
        f"({w['reserve_gib']:g} GiB kept for the CUDA context and NCCL, {w['frag']:.0%} for fragmentation)",
        "  * = the activations counted in the peak",
    ]
    fits = acts["block_fits"]
    what = "router" if fits["router_only"] else "MoE block"
    for key in ("no_input_grad", "input_grad"):
        if key in fits:
            formula = _formula(fits[key]["coef"], fits["terms"])
            lines.append(f"  {what} saved bytes, fitted on real blocks ({key.replace('_', ' ')}): {formula}")
    layer = max(acts["layers"], key=lambda parts: sum(parts.values()))
    lines += [
        "",
        f"largest layer's saved activations, {unit}: "
        + ", ".join(f"{k} {_gib(v)}" for k, v in layer.items()),
    ]
    t = p["traffic"]
    lines += ["", f"{'traffic per rank and step':<44}{'payload ' + unit:>11}{'wire ' + unit:>10}"]
    for c in t["collectives"]:
        what = f"{c['what']} (group {c['group']}, ×{c['times']})"
        lines.append(f"  {what:<42}{_gib(c['payload']):>11}{_gib(c['wire']):>10}")
    lines.append(f"  {'total':<42}{_gib(t['payload']):>11}{_gib(t['wire']):>10}")
    if "measured" in p:
        planned, measured = p["measured"]["planned"], p["measured"]["measured"]
        title = "checked here: world 1, ZeRO-0, one step"
        lines += ["", f"{title:<44}{'planned':>11}{'measured':>10}{'ratio':>7}"]
        for k in ("frozen", "trainable", "grads", "optimizer", "activations", "total"):
            ratio = planned[k] / measured[k]
            lines.append(f"  {k:<42}{_gib(planned[k]):>11}{_gib(measured[k]):>10}{ratio:7.3f}")
        lines.append(f"  {'peak RSS growth (for information)':<42}{'':>11}{_gib(measured['rss_growth']):>10}")
    return "\n".join(lines)
