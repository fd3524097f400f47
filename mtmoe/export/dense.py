"""Folding a trained MoE-LoRA model back into its base architecture, and saving it for plain transformers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from mtmoe.export.merge import METHODS, tensor_seed
from mtmoe.model.experts import PROJECTIONS
from mtmoe.model.moe_lm import MoELM
from mtmoe.model.walk import decoder_layers, lora_linears, moe_blocks


@dataclass(frozen=True)
class MergeSpec:
    """How each block's experts become one delta.

    u are the expert shares renormalised over the n kept experts. `average` gives Σ u_e ΔW_e. The summing
    methods (`task_arithmetic`, `dare`, `breadcrumbs`) see D_e = n·u_e·ΔW_e (with uniform shares, each
    expert's own delta) and default to λ = 1/n, the average's scale. `ties` takes the deltas with the
    shares as weights: its weighted disjoint mean at λ = 1 is on the average's scale for any shares.
    DARE draws each tensor's masks from its own seed, derived from `seed` and the tensor's name.

    Attributes:
        method: A key of `mtmoe.export.merge.METHODS`.
        lam: λ (None = the method's natural scale above).
        density: TIES' kept fraction.
        drop: DARE's drop rate.
        beta: Breadcrumbs' outlier fraction.
        gamma: Breadcrumbs' small-entry fraction.
        seed: DARE's run seed (each tensor's masks use `tensor_seed(seed, name)`).
    """

    method: str = "average"
    lam: float | None = None
    density: float = 0.2
    drop: float = 0.5
    beta: float = 0.01
    gamma: float = 0.8
    seed: int = 0

    def merge(self, deltas_EOI: torch.Tensor, shares_E: torch.Tensor, name: str = "") -> torch.Tensor:
        """One merged delta from the kept experts' deltas and their (renormalised) shares.

        Args:
            deltas_EOI: The kept experts' deltas of one tensor.
            shares_E: Their shares, summing to one.
            name: The tensor's module name: it seeds DARE's masks for this tensor.
        """
        if self.method not in METHODS:
            raise ValueError(f"--merge {self.method!r}: expected one of {sorted(METHODS)}")
        n = len(shares_E)
        if self.method == "average":
            return METHODS["average"](deltas_EOI, shares_E)
        if self.method == "ties":
            return METHODS["ties"](deltas_EOI, self.density, 1.0 if self.lam is None else self.lam, shares_E)
        d_EOI = deltas_EOI * (n * shares_E).to(deltas_EOI.dtype)[:, None, None]
        lam = self.lam if self.lam is not None else 1.0 / n
        if self.method == "task_arithmetic":
            return METHODS["task_arithmetic"](d_EOI, lam)
        if self.method == "dare":
            return METHODS["dare"](d_EOI, self.drop, lam, tensor_seed(self.seed, name))
        return METHODS["breadcrumbs"](d_EOI, self.beta, self.gamma, lam)


@torch.no_grad()
def merged_deltas(
    model: MoELM,
    shares: dict[int, torch.Tensor] | None,
    kept: dict[int, list[int]] | None = None,
    spec: MergeSpec = MergeSpec(),
) -> dict[str, torch.Tensor]:
    """The weight delta of every linear the export changes, by its module name in the HF model.

    FFN projections get the merge of their block's kept experts; attention projections their exact
    LoRA delta. Deltas are float64, in `nn.Linear` layout (out, in).

    Args:
        model: The trained model.
        shares: Per layer, the merge weight of each expert (e.g. its share of gate mass on held-out
            data); None weighs experts equally.
        kept: Per layer, the experts to keep (None = all); their shares are renormalised.
        spec: The merge method and its parameters.
    """
    lm = model.lm
    deltas = {}
    for i, block in moe_blocks(lm).items():
        E = block.num_experts
        w_E = shares[i].double() if shares is not None else torch.full((E,), 1.0 / E, dtype=torch.float64)
        keep = kept[i] if kept is not None else list(range(E))
        total = w_E[keep].sum()
        u_E = (
            w_E[keep] / total if total > 0 else torch.full((len(keep),), 1.0 / len(keep), dtype=torch.float64)
        )
        for proj in PROJECTIONS:
            name = f"model.layers.{i}.mlp.{proj}_proj"
            delta_OI = spec.merge(block.experts.weight_delta(proj).double()[keep], u_E, name)
            if block.shared is not None:  # always-on experts fold in exactly, whatever the merge
                delta_OI = delta_OI + block.shared.weight_delta(proj).double().sum(0)
            deltas[name] = delta_OI
    for name, lora in lora_linears(lm).items():
        deltas[name] = lora.weight_delta().double()
    return deltas


@torch.no_grad()
def task_gate_shares(model: MoELM, task: int | None) -> dict[int, torch.Tensor]:
    """Per layer, a task's learned gate (`moe.task_routing: gate`); None averages the tasks' gates.

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
    spec: MergeSpec = MergeSpec(),
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
    model.load_state_dict(state, strict=False)  # trainable tensors and the routers' balancing biases
