"""Expert utilization: tokens and gate mass per task, per layer and per expert, summed over ranks."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from mtmoe.balance.task_loss import all_reduce_sum
from mtmoe.model.inject import moe_blocks


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
    from mtmoe.export.prune import expert_shares

    return expert_shares(util, None, key)


def save_utilization(util: dict, path: Path) -> None:
    """Writes the utilization JSON."""
    path.write_text(json.dumps(util, indent=1))


def load_utilization(path: Path) -> dict:
    """Reads a utilization JSON written by `save_utilization`."""
    return json.loads(path.read_text())
