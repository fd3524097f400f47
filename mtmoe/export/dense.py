"""Folding a trained MoE-LoRA model back into its base architecture, and saving it for plain transformers."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from mtmoe.export.merge import weighted_average
from mtmoe.model.experts import PROJECTIONS
from mtmoe.model.inject import decoder_layers, lora_linears, moe_blocks
from mtmoe.model.moe_lm import MoELM


@torch.no_grad()
def fold_to_dense(model: MoELM, shares: dict[int, torch.Tensor] | None) -> PreTrainedModel:
    """Folds every MoE-LoRA block and attention LoRA into the base weights, in place on `model.lm`.

    Each block becomes its base FFN plus the weighted average of the experts' ΔW; each attention LoRA
    becomes its base linear plus its (exact) ΔW.

    Args:
        model: The trained model.
        shares: Per layer, the merge weight of each expert (e.g. its share of gate mass on held-out
            data); None weighs experts equally.

    Returns:
        The dense HF model (the same object as `model.lm`).
    """
    lm = model.lm
    layers = decoder_layers(lm)
    for i, block in moe_blocks(lm).items():
        E = block.router.num_experts
        w_E = shares[i] if shares is not None else torch.ones(E, dtype=torch.float64)
        for proj in PROJECTIONS:
            linear = getattr(block.base, f"{proj}_proj")
            delta_OI = weighted_average(block.experts.weight_delta(proj).double(), w_E.double())
            linear.weight.add_(delta_OI.to(linear.weight.dtype))
        layers[i].mlp = block.base
    for name, lora in lora_linears(lm).items():
        lora.base.weight.add_(lora.weight_delta().to(lora.base.weight.dtype))
        parent_name, _, attr = name.rpartition(".")
        setattr(lm.get_submodule(parent_name), attr, lora.base)
    for p in lm.parameters():
        p.requires_grad_(True)
    return lm


def save_dense(lm: PreTrainedModel, tokenizer, out: Path) -> None:
    """Saves an HF folder that `AutoModelForCausalLM.from_pretrained` loads without mtmoe.

    The folder holds safetensors weights, the config and the tokenizer with its chat template.
    """
    leftovers = [n for n, m in lm.named_modules() if type(m).__module__.startswith("mtmoe")]
    if leftovers:
        raise RuntimeError(f"export would need mtmoe to load: {leftovers[:3]}")
    out.mkdir(parents=True, exist_ok=True)
    lm.save_pretrained(out)
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
    model.load_state_dict({n: t for n, t in state.items() if n in own}, strict=False)
