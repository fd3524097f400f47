"""Expert utilization: tokens and gate mass per task, per layer and per expert, summed over ranks."""

from __future__ import annotations

import json
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
