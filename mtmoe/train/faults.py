"""Fault injection for the reliability tests, driven by environment variables (unset in normal runs).

- `MTMOE_FAULT_NAN_STEPS=3,4,5` (with `MTMOE_FAULT_NAN_RANK`, default 0): that rank's loss becomes NaN at
  those steps.
- `MTMOE_FAULT_SAVE_PAUSE=4:60`: rank 0 sleeps 60 s in the middle of writing the step-4 checkpoint
  (after its files are written, before the folder is renamed), so a test can kill it there.
"""

from __future__ import annotations

import os
import time

import torch


def nan_loss(loss: torch.Tensor, step: int, rank: int) -> torch.Tensor:
    """The loss, or NaN when a fault is configured for this step and rank."""
    steps = os.environ.get("MTMOE_FAULT_NAN_STEPS", "")
    if steps and step in {int(s) for s in steps.split(",")}:
        if rank == int(os.environ.get("MTMOE_FAULT_NAN_RANK", "0")):
            return loss * float("nan")
    return loss


def pause_in_save(step: int) -> None:
    """Sleeps when a mid-save pause is configured for this step."""
    spec = os.environ.get("MTMOE_FAULT_SAVE_PAUSE", "")
    if spec:
        at, seconds = spec.split(":")
        if int(at) == step:
            print(f"[mtmoe] fault injection: pausing {seconds} s inside the step-{step} save", flush=True)
            time.sleep(float(seconds))
