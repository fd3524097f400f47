"""Expert utilization: tokens and gate mass per task, per layer and per expert, summed over ranks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from mtmoe.model.walk import moe_blocks
from mtmoe.parallel.dist import all_reduce_sum


def gather_utilization(lm: nn.Module, task_names: list[str]) -> dict:
    """Reads (and sums over ranks) the counters of every MoE block.

    Returns:
        {"tasks": [...], "num_experts": E, "layers": {"<l>": {"tokens": [[X][E]], "mass": [[X][E]]}}}.
    """
    layers = {}
    for i, block in moe_blocks(lm).items():
        tokens = all_reduce_sum(block.util_tokens_XE.cpu())
        mass = all_reduce_sum(block.util_mass_XE.cpu())
        layers[str(i)] = {"tokens": tokens.tolist(), "mass": mass.tolist()}
    num_experts = next(iter(moe_blocks(lm).values())).num_experts if layers else 0
    return {"tasks": list(task_names), "num_experts": num_experts, "layers": layers}


def layer_shares(util: dict, key: str = "mass") -> dict[int, torch.Tensor]:
    """Per layer, each expert's share of `key` summed over tasks (sums to 1; uniform when empty)."""
    return expert_shares(util, None, key)


def save_utilization_counters(lm_or_model: nn.Module) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """A copy of every MoE block's counters (to count something else, then put them back)."""
    lm = getattr(lm_or_model, "lm", lm_or_model)
    return {i: (b.util_tokens_XE.clone(), b.util_mass_XE.clone()) for i, b in moe_blocks(lm).items()}


def restore_utilization_counters(lm_or_model: nn.Module, saved: dict) -> None:
    """Puts back the counters `save_utilization_counters` copied."""
    lm = getattr(lm_or_model, "lm", lm_or_model)
    for i, block in moe_blocks(lm).items():
        tokens, mass = saved[i]
        block.util_tokens_XE.copy_(tokens)
        block.util_mass_XE.copy_(mass)


def routing_summary(util: dict) -> dict[str, float]:
    """Per layer, how evenly its tokens spread over the experts, as a few scalars to log.

    `max_load`: the busiest expert's share × E (1 = even, E = one expert takes everything); `cv`: the
    coefficient of variation of the experts' shares (0 = even); `entropy`: their entropy / log E (1 =
    even, 0 = one expert). The means over layers are logged too (`routing/max_load`, ...).
    """
    out: dict[str, float] = {}
    per_layer = []
    for layer, share_E in layer_shares(util, "tokens").items():
        E = len(share_E)
        entropy = (
            -(share_E * share_E.clamp_min(1e-12).log()).sum() / math.log(E) if E > 1 else torch.tensor(1.0)
        )
        stats = {
            "max_load": float(share_E.max() * E),
            "cv": float(share_E.std(unbiased=False) / share_E.mean()),
            "entropy": float(entropy),
        }
        out.update({f"routing/L{layer:02d}/{k}": v for k, v in stats.items()})
        per_layer.append(stats)
    for k in ("max_load", "cv", "entropy"):
        if per_layer:
            out[f"routing/{k}"] = sum(s[k] for s in per_layer) / len(per_layer)
    return out


def save_utilization(util: dict, path: Path) -> None:
    """Writes the utilization JSON."""
    path.write_text(json.dumps(util, indent=1))


def load_utilization(path: Path) -> dict:
    """Reads a utilization JSON written by `save_utilization`."""
    return json.loads(path.read_text())


def expert_shares(util: dict, task: str | None = None, key: str = "mass") -> dict[int, torch.Tensor]:
    """Per layer, each expert's share of `key` over all tasks or for `task` (uniform when it saw nothing).

    Raises:
        ValueError: For a task the utilization does not know.
    """
    if task is not None and task not in util["tasks"]:
        raise ValueError(f"--task {task!r}: the run's tasks are {util['tasks']}")
    shares = {}
    for layer, counts in util["layers"].items():
        table_XE = torch.tensor(counts[key], dtype=torch.float64)
        total_E = table_XE.sum(0) if task is None else table_XE[util["tasks"].index(task)]
        shares[int(layer)] = (
            total_E / total_E.sum() if total_E.sum() > 0 else torch.full_like(total_E, 1.0 / len(total_E))
        )
    return shares
