"""Checkpoints: DeepSpeed's engine state (trainable weights and optimizer) plus the loop's own state.

Frozen base weights are not written (`exclude_frozen_parameters`): they come from the base model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.distributed as dist


def checkpoint_dir(run_dir: Path) -> Path:
    """Where a run keeps its checkpoints."""
    return run_dir / "checkpoints"


def save(engine, run_dir: Path, step: int, loop_state: dict[str, Any], sampler_state: dict) -> None:
    """Saves a checkpoint tagged `step_<n>` and points `latest` at it.

    Every rank's sampler position is gathered into the client state, so ranks resume where they were.
    """
    samplers: list[dict | None] = [None] * dist.get_world_size()
    dist.all_gather_object(samplers, sampler_state)
    client = {**loop_state, "step": step, "samplers": samplers}
    engine.save_checkpoint(
        str(checkpoint_dir(run_dir)),
        tag=f"step_{step:06d}",
        client_state=client,
        exclude_frozen_parameters=True,
    )


def latest_tag(run_dir: Path) -> str | None:
    """The tag of the newest checkpoint, or None."""
    latest = checkpoint_dir(run_dir) / "latest"
    return latest.read_text().strip() if latest.exists() else None


def load(engine, run_dir: Path, rank: int) -> tuple[dict[str, Any], dict | None]:
    """Loads the newest checkpoint into `engine`.

    Returns:
        (client state, this rank's sampler state or None when the world size changed).

    Raises:
        ValueError: If the run directory has no checkpoint.
    """
    tag = latest_tag(run_dir)
    if tag is None:
        raise ValueError(f"--resume: no checkpoint under {checkpoint_dir(run_dir)}")
    _, client = engine.load_checkpoint(str(checkpoint_dir(run_dir)), tag=tag, load_module_strict=False)
    samplers = client.get("samplers", [])
    same_world = len(samplers) == dist.get_world_size()
    return client, samplers[rank] if same_world else None
