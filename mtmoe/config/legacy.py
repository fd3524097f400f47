"""The flat router keys of earlier recipes and run folders, read into `moe.router` / `moe.router_options`.

Until the router registry, a recipe set a router's settings as flat `moe.*` keys, and every run folder's
`config.yaml` holds them all (defaults included). They still load: each is moved to the chosen router's
options, a default value that belongs to another router is dropped, and a set value that belongs to
another router is refused. A `FutureWarning` names the new key of every moved one.
"""

from __future__ import annotations

import warnings
from typing import Any

# old key -> (the router it configures, its option there, the old default)
ROUTER_KEYS: dict[str, tuple[str, str, Any]] = {
    "score": ("topk", "score", "softmax"),
    "router_noise": ("topk", "noise_std", 0.0),
    "normalize_top_k": ("topk", "normalize", True),
    "router_init_std": ("topk", "init_std", 0.02),
    "balance_bias_rate": ("topk", "balance_bias_rate", 0.0),
    "aux_loss_coef": ("topk", "aux_loss_coef", 0.01),
    "z_loss_coef": ("topk", "z_loss_coef", 0.0),
    "native_router_trainable": ("topk", "trainable", True),
    "soft_tau": ("soft", "tau", 5.0),
}


def migrate_router_keys(raw: dict[str, Any], where: str) -> None:
    """Moves the old flat router keys of `raw` (a recipe's sections) into `moe.router_options`, in place.

    Raises:
        ValueError: Naming the old key, for a set value of another router or an unknown `task_routing`.
    """
    moe = raw.get("moe")
    if not isinstance(moe, dict) or not (set(moe) & (set(ROUTER_KEYS) | {"task_routing"})):
        return
    options = dict(moe.get("router_options") or {})
    moved = []
    if "task_routing" in moe:
        routing = moe.pop("task_routing")
        if routing == "gate":
            moe["router"] = "task_gate"
            moved.append("moe.task_routing=gate -> moe.router=task_gate")
        elif routing == "embedding":
            options["task_embedding"] = True
            moved.append("moe.task_routing=embedding -> moe.router_options.task_embedding=true")
        elif routing != "none":
            raise ValueError(
                f"{where}: config key 'moe.task_routing': expected none|embedding|gate, got {routing!r}"
            )
    router = moe.get("router", "topk")
    for key in [k for k in moe if k in ROUTER_KEYS]:
        owner, option, default = ROUTER_KEYS[key]
        value = moe.pop(key)
        if owner == router:
            options.setdefault(option, value)
            moved.append(f"moe.{key} -> moe.router_options.{option}")
        elif value != default:
            raise ValueError(
                f"{where}: config key 'moe.{key}' sets the {owner} router, but moe.router is {router}"
            )
    moe["router_options"] = options
    if moved:
        warnings.warn(
            f"{where}: old router keys read as: {'; '.join(moved)} (docs/config.md, Router options)",
            FutureWarning,
            stacklevel=3,
        )
