"""Per-task PEFT LoRA adapters from merged deltas, for multi-LoRA serving on the plain base model.

Each changed linear's ΔW (see `merged_deltas`) is compressed by truncated SVD, ΔW ≈ B·A with
B = U_r·√S_r and A = √S_r·V_rᵀ, and written as a standard PEFT adapter (scaling 1: `lora_alpha = r`)
that `PeftModel.from_pretrained(base, folder)` loads. With r at least the delta's rank (experts × expert
rank for an FFN, the attention LoRA's rank for attention), the adapter reproduces the export exactly.

Shape legend: O output features, I input features, R adapter rank.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel


def lora_factors(delta_OI: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_RI, B_OR) with B·A the best rank-`rank` approximation of `delta_OI` (Eckart–Young)."""
    u_OK, s_K, vh_KI = torch.linalg.svd(delta_OI.double(), full_matrices=False)
    r = min(rank, len(s_K))
    root_R = s_K[:r].sqrt()
    return root_R[:, None] * vh_KI[:r], u_OK[:, :r] * root_R[None, :]


@torch.no_grad()
def write_adapter(base: PreTrainedModel, deltas: dict[str, torch.Tensor], rank: int, out: Path) -> Path:
    """Writes one PEFT LoRA adapter for `base` whose ΔW approximate `deltas` (by module name).

    Args:
        base: A fresh copy of the frozen base model (it is wrapped by PEFT and then discarded).
        deltas: ΔW (out, in) per linear module name of `base`.
        rank: Adapter rank r.
        out: The adapter folder.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        lora_dropout=0.0,
        target_modules=sorted(deltas),
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(base, config)
    for name, delta_OI in deltas.items():
        module = peft_model.base_model.model.get_submodule(name)
        a_RI, b_OR = lora_factors(delta_OI, rank)
        r = a_RI.shape[0]
        module.lora_A["default"].weight.zero_()[:r].copy_(a_RI.to(module.lora_A["default"].weight.dtype))
        module.lora_B["default"].weight.zero_()[:, :r].copy_(b_OR.to(module.lora_B["default"].weight.dtype))
    peft_model.save_pretrained(out)
    return out
