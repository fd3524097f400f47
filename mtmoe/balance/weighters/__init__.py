"""Task weighters: how much each task's token-mean loss counts in the total.

Each weighter is one small class with an explicit `state_dict`, chosen by `balance.weighter`:
`uniform` (MFTCoder's data-balanced loss: every task counts equally), `token_mean` (every token counts
equally: the plain baseline), `static`, `dwa`, `uncertainty`,
`famo` and `coba`. See `base.py` for the contract.
"""

from __future__ import annotations

from mtmoe.balance.weighters.base import TaskWeighter
from mtmoe.balance.weighters.coba import CoBa
from mtmoe.balance.weighters.dwa import DWA
from mtmoe.balance.weighters.famo import FAMO
from mtmoe.balance.weighters.static import Static, TokenMean, Uniform
from mtmoe.balance.weighters.uncertainty import Uncertainty

WEIGHTERS: dict[str, type[TaskWeighter]] = {
    "uniform": Uniform,
    "token_mean": TokenMean,
    "static": Static,
    "dwa": DWA,
    "uncertainty": Uncertainty,
    "famo": FAMO,
    "coba": CoBa,
}


def build_weighter(cfg, task_names: list[str]) -> TaskWeighter:
    """The weighter named by `balance.weighter`, over the manifest's tasks (in id order).

    Args:
        cfg: The `BalanceConfig`.
        task_names: All task names, in task-id order.
    """
    kwargs = {
        "static": {"task_names": task_names, "static_weights": cfg.static_weights},
        "dwa": {"temperature": cfg.dwa_temperature, "ema": cfg.dwa_ema},
        "uncertainty": {"lr": cfg.uncertainty_lr},
        "famo": {"lr": cfg.famo_lr, "weight_decay": cfg.famo_weight_decay},
        "coba": {"warmup": cfg.coba_warmup, "history": cfg.coba_history, "tau": cfg.coba_tau},
    }.get(cfg.weighter, {})
    return WEIGHTERS[cfg.weighter](len(task_names), **kwargs)


__all__ = [
    "build_weighter",
    "CoBa",
    "DWA",
    "FAMO",
    "Static",
    "TaskWeighter",
    "TokenMean",
    "Uncertainty",
    "Uniform",
    "WEIGHTERS",
]
