"""Native MoE experts: a checkpoint's own experts (Mixtral, Qwen2-MoE, Qwen3-MoE), frozen, with LoRA on each.

`NativeMoELoRA` replaces one HF sparse MoE block. Its router starts as the checkpoint's gate; its experts
are the checkpoint's, frozen, plus a per-expert LoRA on gate, up and down:
    y_t = Σ_k g_tk (W_down,e + ΔW_down,e) [act((W_gate,e + ΔW_gate,e) x_t) * ((W_up,e + ΔW_up,e) x_t)]
with e = ids_tk, the ΔW low rank. Every expert has its own frozen weights here (unlike the upcycled
family), so expert parallelism shards them: a rank keeps only its own experts' weights and the
assignments move to their owner (`mtmoe.parallel.expert_parallel`). Qwen2-MoE adds its frozen shared
expert, gated by sigmoid(shared_expert_gate(x)), as HF does.

The export folds every expert's LoRA into its weights and gives a standard HF checkpoint of the same
architecture, optionally with fewer experts (pruning).

Shape legend: B batch, S sequence, T = B*S tokens, D hidden, F expert FFN width, G = 2F (gate | up
fused), E experts of the block, L experts on this rank, K top-k, N assignments sorted by expert.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from mtmoe.model.dispatch import ExpertGroups, combine, grouped_linear
from mtmoe.model.experts import UpcycledLoRAExperts
from mtmoe.model.moe_base import MoEBlock, RoutingContext
from mtmoe.model.routers import RouterShape, TopKOptions, TopKRouter
from mtmoe.model.walk import decoder_layers, lora_linears
from mtmoe.model.zero3 import gathered
from mtmoe.parallel.expert_parallel import (
    ExpertPlacement,
    MoEMarker,
    expert_parallel_apply,
    mark_expert_params,
)

# HF blocks with the same computation: a softmax top-k `gate` (weight (E, D); renormalised always, or
# as `gate.norm_topk_prob` says), fused `experts` (gate_up_proj (E, 2F, D), down_proj (E, D, F), act_fn),
# and, in Qwen2-MoE, a sigmoid-gated `shared_expert`.
SUPPORTED_BLOCKS = frozenset({"MixtralSparseMoeBlock", "Qwen2MoeSparseMoeBlock", "Qwen3MoeSparseMoeBlock"})


def _is_sparse_block(mlp: nn.Module) -> bool:
    return type(mlp).__name__ in SUPPORTED_BLOCKS


class NativeMoELoRA(MoEBlock):
    """Replaces one HF sparse MoE block: router, frozen experts with per-expert LoRA, shared expert.

    Args:
        hf_block: The HF block (`MixtralSparseMoeBlock`, `Qwen2MoeSparseMoeBlock` or
            `Qwen3MoeSparseMoeBlock`). Only this rank's experts' weights are copied out of it; the block
            itself is not kept, except its shared expert.
        context: The model's shared routing context.
        rank: LoRA rank R.
        alpha: LoRA alpha (deltas are scaled by alpha / R).
        placement: Where the experts live (default: all on this rank).
        capacity_factor: 0 for dropless routing, else the per-rank expert capacity factor (training only;
            evaluation is always dropless). An assignment over capacity contributes nothing.
        router_options: The top-k router's options (`moe.router_options`); the router starts as the
            checkpoint's gate and keeps its weight normalisation (Mixtral's, or Qwen's `norm_topk_prob`).

    Raises:
        ValueError: For an unsupported block, or a placement of another number of experts.
    """

    def __init__(
        self,
        hf_block: nn.Module,
        context: RoutingContext,
        rank: int,
        alpha: float,
        placement: ExpertPlacement | None = None,
        capacity_factor: float = 0.0,
        router_options: TopKOptions | None = None,
    ):
        if not _is_sparse_block(hf_block):
            raise ValueError(
                f"{type(hf_block).__name__} is not a supported sparse MoE block: {sorted(SUPPORTED_BLOCKS)}"
            )
        gate, hf_experts = hf_block.gate, hf_block.experts
        E, D = gate.weight.shape
        super().__init__(E, context)
        placement = placement or ExpertPlacement(E)
        if placement.num_experts != E:
            raise ValueError(f"the placement has {placement.num_experts} experts, the block {E}")
        self.placement, self.capacity_factor = placement, capacity_factor
        # Mixtral always renormalises the top-k weights; Qwen2/3-MoE as `norm_topk_prob` says.
        normalize = bool(getattr(gate, "norm_topk_prob", True))
        options = dataclasses.replace(router_options or TopKOptions(), normalize=normalize)
        self.router = TopKRouter.from_options(options, RouterShape(D, E, gate.top_k))
        if gate.weight.is_meta:  # an empty base (the streamed export): a checkpoint fills it, or nothing
            trains = self.router.weight_ED.requires_grad
            self.router.weight_ED = nn.Parameter(torch.empty_like(gate.weight), requires_grad=trains)
        else:
            with torch.no_grad():
                self.router.weight_ED.copy_(gate.weight)
        self.jitter_noise = float(getattr(hf_block, "jitter_noise", 0.0))

        local = placement.local
        # A model loaded with only this rank's experts (`sharded_load`) holds exactly their rows.
        loaded = getattr(hf_experts, "local_experts", None)
        if loaded is not None and loaded != local:
            raise ValueError(f"the model was loaded with experts {loaded}, the placement keeps {local}")
        rows = slice(None) if loaded is not None else local
        # HF keeps nn.Linear layout (out, in); grouped_mm wants (in, out): one copy, of the local slice only.
        self.gate_up_LDG = nn.Parameter(
            hf_experts.gate_up_proj.detach()[rows].transpose(1, 2).contiguous(), requires_grad=False
        )
        self.down_LFD = nn.Parameter(
            hf_experts.down_proj.detach()[rows].transpose(1, 2).contiguous(), requires_grad=False
        )
        self.act_fn = hf_experts.act_fn
        ffn_dim = self.down_LFD.shape[1]
        self.experts = UpcycledLoRAExperts(E, D, ffn_dim, rank, alpha, local).to(self.gate_up_LDG.device)
        self.shared_expert = getattr(hf_block, "shared_expert", None)
        self.shared_expert_gate = getattr(hf_block, "shared_expert_gate", None)
        for module in (self.shared_expert, self.shared_expert_gate):
            if module is not None:
                module.requires_grad_(False)

    @property
    def ffn_dim(self) -> int:
        """F, the width of one expert's FFN."""
        return self.down_LFD.shape[1]

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        """Runs the block; appends the router's auxiliary losses to the context."""
        B, S, D = x_BSD.shape
        T = B * S
        x_TD = x_BSD.reshape(T, D)
        if self.training and self.jitter_noise > 0:  # Mixtral's multiplicative jitter, on router and experts
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        route = self.route(x_TD)
        d = self.dispatch_route(route, route.weights_TK, self.capacity_factor)

        x_ND = x_TD[d.token_N]
        if self.placement.ep_size == 1:
            y_ND = self.expert_outputs(x_ND, d.groups)
        else:
            y_ND = expert_parallel_apply(x_ND, d.groups.counts_E, self.placement, self._local_outputs)
        # Dropped and padding assignments are simply absent: they contribute zero, as in HF.
        out_TD = combine(y_ND * d.weight_N[:, None].to(y_ND.dtype), d, T)
        if self.shared_expert is not None:
            out_TD = out_TD + F.sigmoid(self.shared_expert_gate(x_TD)) * self.shared_expert(x_TD)
        return out_TD.reshape(B, S, D)

    def expert_outputs(self, x_ND: torch.Tensor, groups: ExpertGroups) -> torch.Tensor:
        """Runs this rank's experts (frozen weights plus LoRA) on rows grouped by local expert.

        Args:
            x_ND: Block inputs, grouped by expert.
            groups: Rows per local expert.

        Returns:
            Each row's expert output, without its gate weight.
        """
        ex = self.experts
        gate_NF, up_NF = grouped_linear(x_ND, self.gate_up_LDG, groups).chunk(2, dim=1)
        gate_NF = gate_NF + ex.delta("gate", x_ND, groups)
        up_NF = up_NF + ex.delta("up", x_ND, groups)
        h_NF = self.act_fn(gate_NF) * up_NF
        return grouped_linear(h_NF, self.down_LFD, groups) + ex.delta("down", h_NF, groups)

    def _local_outputs(self, rows_MD: torch.Tensor, counts_L: torch.Tensor) -> torch.Tensor:
        """`expert_outputs` on the rows that other ranks sent to this rank's experts."""
        return self.expert_outputs(rows_MD, ExpertGroups.from_counts(counts_L.to(rows_MD.device)))

    @torch.no_grad()
    def merged_hf_weights(self, keep: list[int] | None = None) -> dict[str, torch.Tensor]:
        """This block's tensors under their HF names (relative to the block), LoRA folded in, fp32.

        Args:
            keep: The experts to keep, in the order they get in the exported block (None = all);
                the router keeps their rows.

        Raises:
            ValueError: Under expert parallelism (this rank lacks the other ranks' experts), or for an
                expert id out of range.
        """
        if self.placement.ep_size != 1:
            raise ValueError("merged_hf_weights needs every expert on this rank (ep_size 1)")
        E = self.num_experts
        keep = list(range(E)) if keep is None else list(keep)
        if not keep or len(set(keep)) < len(keep) or any(not 0 <= e < E for e in keep):
            raise ValueError(f"kept experts {keep} must be distinct ids in 0..{E - 1}")
        ex = self.experts
        gate_up_EGD = self.gate_up_LDG.float().transpose(1, 2)
        delta_EGD = torch.cat([ex.weight_delta("gate"), ex.weight_delta("up")], dim=1)
        down_EDF = self.down_LFD.float().transpose(1, 2) + ex.weight_delta("down")
        out = {
            "gate.weight": self.router.weight_ED.float()[keep].clone(),
            "experts.gate_up_proj": (gate_up_EGD + delta_EGD)[keep].contiguous(),
            "experts.down_proj": down_EDF[keep].contiguous(),
        }
        for prefix in ("shared_expert", "shared_expert_gate"):
            module = getattr(self, prefix)
            if module is not None:
                out.update({f"{prefix}.{n}": t.float().clone() for n, t in module.state_dict().items()})
        return out


def is_native_moe(model: nn.Module) -> bool:
    """True when some decoder layer of `model` has a supported HF sparse MoE block (or a replaced one)."""
    try:
        layers = decoder_layers(model)
    except ValueError:
        return False
    return any(_is_sparse_block(layer.mlp) or isinstance(layer.mlp, NativeMoELoRA) for layer in layers)


def _experts_key(config: PretrainedConfig) -> str:
    """The config field that holds the number of experts (Mixtral: `num_local_experts`)."""
    return "num_local_experts" if "num_local_experts" in config.to_dict() else "num_experts"


def native_num_experts(model: nn.Module) -> tuple[int, int]:
    """(E, K) of a native MoE model, from its HF config."""
    config = model.config
    return int(getattr(config, _experts_key(config))), int(config.num_experts_per_tok)


def inject_native_moe(
    model: nn.Module,
    rank: int,
    alpha: float,
    context: RoutingContext,
    placement: ExpertPlacement | None = None,
    capacity_factor: float = 0.0,
    router_options: TopKOptions | None = None,
) -> list[int]:
    """Freezes `model` and replaces each of its sparse MoE blocks by a `NativeMoELoRA` (dense FFNs stay).

    The model's own router-loss output (`config.output_router_logits`) is switched off: the HF router
    modules it records are gone, and the routing context carries the router losses instead.

    Args:
        model: An HF Mixtral, Qwen2-MoE or Qwen3-MoE causal LM.
        rank: LoRA rank.
        alpha: LoRA alpha.
        context: The routing context every block shares.
        placement: For training under DeepSpeed: which experts this rank holds. The expert tensors (LoRA
            factors and frozen weights) are then marked for DeepSpeed's expert groups, and each block
            carries a `MoEMarker`.
        capacity_factor: See `NativeMoELoRA`.
        router_options: See `NativeMoELoRA`.

    Returns:
        The indices of the replaced layers.

    Raises:
        ValueError: If the model has no supported sparse MoE block.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    layers = decoder_layers(model)
    replaced = []
    for i, layer in enumerate(layers):
        if not _is_sparse_block(layer.mlp):
            continue
        args = (rank, alpha, placement, capacity_factor, router_options)
        with gathered(layer.mlp):  # ZeRO-3: the block copies the router and its experts' rows
            block = NativeMoELoRA(layer.mlp, context, *args)
        if placement is not None:
            # Frozen expert weights are marked too: DeepSpeed broadcasts every parameter from rank 0 of
            # its group at start-up, and these differ between the ranks of an expert-parallel group.
            mark_expert_params(block.experts, placement)
            mark_expert_params([block.gate_up_LDG, block.down_LFD], placement)
            block.ds_moe_marker = MoEMarker(placement)
        layer.mlp = block
        replaced.append(i)
    if not replaced:
        raise ValueError(f"{type(model).__name__} has no sparse MoE block among {sorted(SUPPORTED_BLOCKS)}")
    model.config.output_router_logits = False
    return replaced


def native_blocks(model: nn.Module) -> dict[int, NativeMoELoRA]:
    """The injected native blocks by layer index."""
    return {
        i: layer.mlp for i, layer in enumerate(decoder_layers(model)) if isinstance(layer.mlp, NativeMoELoRA)
    }


@torch.no_grad()
def export_native(
    model: nn.Module, keep: dict[int, list[int]] | None = None
) -> tuple[dict[str, torch.Tensor], PretrainedConfig]:
    """A state dict and config of a plain HF model of the same architecture, every LoRA folded in.

    Attention LoRA (`LoRALinear`), if any, is folded too. Every tensor is fp32.

    Args:
        model: A model after `inject_native_moe` (all experts on this rank).
        keep: Per replaced layer, the experts to keep (None = all). Every replaced layer must keep the
            same number of experts (the HF config has one); `num_experts_per_tok` becomes at most that.

    Returns:
        (state_dict, config), for `AutoModelForCausalLM.from_config(config)` and
        `load_state_dict(state_dict, strict=True)`.

    Raises:
        ValueError: For a model without native blocks, a `keep` that misses a layer or keeps different
            numbers of experts, or experts spread over ranks.
    """
    blocks = native_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no NativeMoELoRA block: call inject_native_moe first")
    if keep is not None:
        missing = sorted(set(blocks) - set(keep))
        if missing:
            raise ValueError(f"keep: no experts given for layers {missing}")
        sizes = {len(keep[i]) for i in blocks}
        if len(sizes) != 1:
            raise ValueError(
                f"keep: every layer must keep the same number of experts, got sizes {sorted(sizes)}"
            )
    state = {}
    mlp_prefixes = tuple(f"model.layers.{i}.mlp." for i in blocks)
    loras = lora_linears(model)
    lora_prefixes = tuple(f"{name}." for name in loras)
    for name, t in model.state_dict().items():
        if not name.startswith(mlp_prefixes + lora_prefixes):
            state[name] = t.float().clone()
    for name, lora in loras.items():
        base = lora.base
        state[f"{name}.weight"] = base.weight.float() + lora.weight_delta()
        if base.bias is not None:
            state[f"{name}.bias"] = base.bias.float().clone()
    for i, block in blocks.items():
        merged = block.merged_hf_weights(None if keep is None else keep[i])
        state.update({f"model.layers.{i}.mlp.{n}": t for n, t in merged.items()})
    config = copy.deepcopy(model.config)
    if keep is not None:
        n = len(keep[next(iter(blocks))])
        setattr(config, _experts_key(config), n)
        config.num_experts_per_tok = min(config.num_experts_per_tok, n)
    return state, config
