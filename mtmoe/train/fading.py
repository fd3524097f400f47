"""Router fading: the final steps of training blend every block from its routed MoE to its merged expert.

Over the final `moe.fade_fraction` of training the last steps come to train exactly the model that the
export writes.

The blend weight α is 1 until the fade starts, then falls to 0 at the last step (linear or cosine).
When the fade starts, the experts' shares u are measured once on the held-out set (gate mass per layer,
as the export weighs them), all ranks agree on them, and they are kept in checkpoints.
"""

from __future__ import annotations

import math

import torch

from mtmoe.config import Config
from mtmoe.model.walk import moe_blocks


def fade_start(cfg: Config) -> int:
    """The last step with α = 1 (fading runs over the steps after it)."""
    return int(round(cfg.train.steps * (1 - cfg.moe.fade_fraction)))


def fade_alpha(cfg: Config, step: int) -> float:
    """α at `step` (1 = plain routed MoE, 0 = the merged expert)."""
    start = fade_start(cfg)
    if cfg.moe.fade_fraction == 0 or step <= start:
        return 1.0
    progress = (step - start) / max(1, cfg.train.steps - start)
    if cfg.moe.fade_schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0 - progress


def set_fade_shares(lm: torch.nn.Module, shares: dict[int, list[float]]) -> None:
    """Puts each layer's expert shares into its block."""
    for i, block in moe_blocks(lm).items():
        if not hasattr(block, "fade_shares_E"):  # MoEfied blocks fade every ω to 1: no shares
            continue
        block.fade_shares_E.copy_(torch.tensor(shares[i], dtype=block.fade_shares_E.dtype))
