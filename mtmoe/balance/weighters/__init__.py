"""Task weighters: how much each task's token-mean loss counts in the total.

Each weighter is one small class with an explicit `state_dict` and its options dataclass, registered
by name (`register_weighter`) and chosen by `balance.weighter`: `uniform` (MFTCoder's data-balanced loss:
every task counts equally), `token_mean` (every token counts equally: the plain baseline), `static`,
`dwa`, `uncertainty`, `famo` and `coba`. See `base.py` for the contract. A new weighter is one file
with a registered class, imported below.
"""

from __future__ import annotations

from mtmoe.balance.weighters.base import (
    WEIGHTERS,
    NoOptions,
    TaskWeighter,
    build_weighter,
    register_weighter,
    weighter_class,
    weighter_options,
)
from mtmoe.balance.weighters.coba import CoBa, CoBaOptions
from mtmoe.balance.weighters.dwa import DWA, DWAOptions
from mtmoe.balance.weighters.famo import FAMO, FAMOOptions
from mtmoe.balance.weighters.static import Static, StaticOptions, TokenMean, Uniform
from mtmoe.balance.weighters.uncertainty import Uncertainty, UncertaintyOptions

__all__ = [
    "build_weighter",
    "CoBa",
    "CoBaOptions",
    "DWA",
    "DWAOptions",
    "FAMO",
    "FAMOOptions",
    "NoOptions",
    "register_weighter",
    "Static",
    "StaticOptions",
    "TaskWeighter",
    "TokenMean",
    "Uncertainty",
    "UncertaintyOptions",
    "Uniform",
    "weighter_class",
    "weighter_options",
    "WEIGHTERS",
]
