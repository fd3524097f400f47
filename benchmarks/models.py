"""The models the benchmarks share: the demo recipe, a PEFT LoRA on the same base, adapter set-up, logits."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from benchmarks.cli import TINY_OVERRIDES
from mtmoe.config import Config, load_config
from mtmoe.model.moe_lm import MoELM, build_base, build_model

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "launch" / "recipes" / "demo.yaml"
VOCAB = 49152
PEFT_LORA = {"r": 16, "lora_alpha": 32, "target_modules": ["gate_proj", "up_proj", "down_proj"]}


def recipe(tiny: bool = False, overrides: Sequence[str] = ()) -> Config:
    """The demo recipe (on a tiny random Llama when `tiny`, the smoke test), with `overrides`."""
    return load_config(RECIPE, [*(TINY_OVERRIDES if tiny else ()), *overrides])


def build_mtmoe(cfg: Config, vocab: int = VOCAB) -> MoELM:
    """The recipe's mtmoe model for one task, in training mode."""
    return build_model(cfg, vocab, num_tasks=1).train()


def build_peft(cfg: Config, vocab: int = VOCAB) -> nn.Module:
    """The recipe's base model with one plain rank-16 LoRA on every FFN projection (`PEFT_LORA`)."""
    lora = LoraConfig(
        r=PEFT_LORA["r"], lora_alpha=PEFT_LORA["lora_alpha"], target_modules=PEFT_LORA["target_modules"]
    )
    return get_peft_model(build_base(cfg, vocab), lora).train()


def trainable(module: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters that require grad, by name."""
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def n_trainable(module: nn.Module) -> int:
    """How many parameters require grad."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def perturb_lora_b(module: nn.Module, seed: int, std: float = 0.02) -> None:
    """B factors start at zero (the adapted model is the base); give them small seeded random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in trainable(module).items():
            if name.endswith(("_b", "lora_b")) or ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def moe_logits(
    model: MoELM, ids_BS: torch.Tensor, attn_BS: torch.Tensor, task_B: torch.Tensor
) -> torch.Tensor:
    """The MoE's full-vocabulary logits: the model's own routed forward, then the LM head everywhere."""
    hidden_BSD, _ = model.hidden_states(ids_BS, attn_BS, task_B)
    return model.lm.get_output_embeddings()(hidden_BSD)


def logit_forwards(
    dense: Mapping[str, nn.Module], moe: tuple[str, MoELM], ids_BS: torch.Tensor, task_B: torch.Tensor
) -> dict[str, Callable[[], torch.Tensor]]:
    """One forward per model with full-vocabulary logits (no padding): each dense HF model, then the MoE."""
    attn_BS = torch.ones_like(ids_BS)
    steps = {
        name: functools.partial(
            lambda lm: lm(input_ids=ids_BS, attention_mask=attn_BS, use_cache=False).logits, lm
        )
        for name, lm in dense.items()
    }
    return {**steps, moe[0]: functools.partial(moe_logits, moe[1], ids_BS, attn_BS, task_B)}


def random_batch(
    batch: int, seq: int, vocab: int, loss_fraction: float, seed: int
) -> dict[str, torch.Tensor]:
    """The benchmarks' batch: seeded random tokens, no padding, one task, and a loss mask.

    The mask holds about `loss_fraction` of positions, never position 0; `labels` are HF's (-100 off it).
    """
    gen = torch.Generator().manual_seed(seed)
    input_ids_BS = torch.randint(0, vocab, (batch, seq), generator=gen)
    loss_mask_BS = (torch.rand(batch, seq, generator=gen) < loss_fraction).long()
    loss_mask_BS[:, 0] = 0
    return {
        "input_ids": input_ids_BS,
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
        "loss_mask": loss_mask_BS,
        "labels": torch.where(loss_mask_BS.bool(), input_ids_BS, torch.full_like(input_ids_BS, -100)),
        "task_ids": torch.zeros(batch, dtype=torch.long),
    }
