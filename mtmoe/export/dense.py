"""Folding a trained MoE-LoRA model back into its base architecture, and saving it for plain transformers."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from mtmoe.export.methods import MergeSpec
from mtmoe.model.experts import PROJECTIONS
from mtmoe.model.moe_lm import MoELM
from mtmoe.model.walk import decoder_layers, lora_linears, moe_blocks


@torch.no_grad()
def merged_deltas(
    model: MoELM,
    shares: dict[int, torch.Tensor] | None,
    kept: dict[int, list[int]] | None = None,
    spec: MergeSpec | None = None,
) -> dict[str, torch.Tensor]:
    """The weight delta of every linear the export changes, by its module name in the HF model.

    FFN projections get the merge of their block's kept experts (`ffn_delta`); attention projections
    their exact LoRA delta. Deltas are float64, in `nn.Linear` layout (out, in).

    Args:
        model: The trained model.
        shares: Per layer, the merge weight of each expert (e.g. its share of gate mass on held-out
            data); None weighs experts equally.
        kept: Per layer, the experts to keep (None = all); their shares are renormalised.
        spec: The merge method and its options (None = `average`).
    """
    deltas = {
        f"model.layers.{i}.mlp.{proj}_proj": ffn_delta(block, i, proj, shares, kept, spec)
        for i, block in moe_blocks(model.lm).items()
        for proj in PROJECTIONS
    }
    for name, lora in lora_linears(model.lm).items():
        deltas[name] = lora.weight_delta().double()
    return deltas


@torch.no_grad()
def ffn_delta(
    block: nn.Module,
    i: int,
    proj: str,
    shares: dict[int, torch.Tensor] | None,
    kept: dict[int, list[int]] | None = None,
    spec: MergeSpec | None = None,
) -> torch.Tensor:
    """One FFN projection's delta (`merged_deltas`, float64, (out, in)): block `i`'s kept experts merged."""
    spec = spec or MergeSpec()
    E = block.num_experts
    w_E = shares[i].double() if shares is not None else torch.full((E,), 1.0 / E, dtype=torch.float64)
    keep = kept[i] if kept is not None else list(range(E))
    total = w_E[keep].sum()
    u_E = w_E[keep] / total if total > 0 else torch.full((len(keep),), 1.0 / len(keep), dtype=torch.float64)
    name = f"model.layers.{i}.mlp.{proj}_proj"
    delta_OI = spec.merge(block.experts.weight_delta(proj).double()[keep], u_E, name)
    if block.shared is not None:  # always-on experts fold in exactly, whatever the merge
        delta_OI = delta_OI + block.shared.weight_delta(proj).double().sum(0)
    return delta_OI


@torch.no_grad()
def task_gate_shares(model: MoELM, task: int | None) -> dict[int, torch.Tensor]:
    """Per layer, a task's learned gate (`moe.router: task_gate`); None averages the tasks' gates.

    Merging with a task's own gate (`average`, nothing pruned) gives exactly that task's model.
    """
    shares = {}
    for i, block in moe_blocks(model.lm).items():
        gates_XE = block.router.task_logits_XE.double().softmax(dim=-1)
        shares[i] = gates_XE.mean(0) if task is None else gates_XE[task]
    return shares


@torch.no_grad()
def fold_peft_lora(lm: nn.Module) -> int:
    """PEFT's own merge of every PEFT LoRA layer into its base linear, in place (`moe.family: lora`).

    Returns:
        How many layers were merged.
    """
    from peft.tuners.lora import LoraLayer

    names = [name for name, m in lm.named_modules() if isinstance(m, LoraLayer)]
    for name in names:
        layer = lm.get_submodule(name)
        layer.merge(safe_merge=True)
        parent, _, attr = name.rpartition(".")
        setattr(lm.get_submodule(parent), attr, layer.get_base_layer())
    return len(names)


@torch.no_grad()
def fold_to_dense(
    model: MoELM,
    shares: dict[int, torch.Tensor] | None,
    kept: dict[int, list[int]] | None = None,
    spec: MergeSpec | None = None,
) -> PreTrainedModel:
    """Folds every MoE-LoRA block and attention LoRA into the base weights, in place on `model.lm`.

    Each block becomes its base FFN plus the merge of its kept experts' ΔW (`merged_deltas`); each
    attention LoRA becomes its base linear plus its exact ΔW; PEFT LoRA layers (`moe.family: lora`) are
    merged by PEFT.

    Returns:
        The dense HF model (the same object as `model.lm`).
    """
    lm = model.lm
    fold_peft_lora(lm)
    layers = decoder_layers(lm)
    for i, block in moe_blocks(lm).items():
        if hasattr(block, "to_dense_mlp"):  # MoEfied: the FFN with every slice's LoRA, all gates at 1
            layers[i].mlp = block.to_dense_mlp()
    deltas = merged_deltas(model, shares, kept, spec)
    for i, block in moe_blocks(lm).items():
        layers[i].mlp = block.base
    for name, lora in lora_linears(lm).items():
        parent_name, _, attr = name.rpartition(".")
        setattr(lm.get_submodule(parent_name), attr, lora.base)
    for name, delta_OI in deltas.items():
        linear = lm.get_submodule(name)
        linear.weight.add_(delta_OI.to(linear.weight.dtype))
    for p in lm.parameters():
        p.requires_grad_(True)
    return lm


SHARD_SIZE = "5GB"


def save_dense(lm: PreTrainedModel, tokenizer, out: Path) -> None:
    """Saves an HF folder that `AutoModelForCausalLM.from_pretrained` loads without mtmoe.

    The folder holds safetensors weights (in shards of at most `SHARD_SIZE`, with the index
    `from_pretrained` reads, as the hub does), the config and the tokenizer with its chat template.
    """
    leftovers = [n for n, m in lm.named_modules() if type(m).__module__.startswith("mtmoe")]
    if leftovers:
        raise RuntimeError(f"export would need mtmoe to load: {leftovers[:3]}")
    out.mkdir(parents=True, exist_ok=True)
    lm.save_pretrained(out, max_shard_size=SHARD_SIZE)
    tokenizer.save_pretrained(out)


def load_trainable(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Loads trained tensors into the model; every trainable parameter must be present.

    Raises:
        ValueError: Naming a trainable parameter missing from `state`, or a key the model lacks.
    """
    own = {n for n, p in model.named_parameters() if p.requires_grad}
    known = set(model.state_dict())
    missing, unexpected = sorted(own - set(state)), sorted(set(state) - known)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    model.load_state_dict(state, strict=False)  # trainable tensors and the routers' balancing biases
