"""Finding the parts of a Hugging Face decoder: its layers, its MoE blocks and its LoRA linears."""

from __future__ import annotations

from torch import nn

from mtmoe.model.lora import LoRALinear
from mtmoe.model.moe_base import MoEBlock


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Llama/Mistral/Qwen2-style HF causal LM.

    Raises:
        ValueError: If the model has no `model.layers`.
    """
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: expected decoder layers at `model.model.layers`")
    return layers


def moe_blocks(model: nn.Module) -> dict[int, MoEBlock]:
    """The injected blocks (of any family) by layer index."""
    return {i: layer.mlp for i, layer in enumerate(decoder_layers(model)) if isinstance(layer.mlp, MoEBlock)}


def lora_linears(model: nn.Module) -> dict[str, LoRALinear]:
    """The attention LoRA layers by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
