"""Routers, one registered class per file.

`topk` (token choice, the default), `soft` (EMTAL's soft router over MoEfied slices) and `task_gate`
(MOELoRA's per-task gate). `base.py` holds the extension point (`Router`, `register_router`,
`build_router`); `moe.router` chooses one and `moe.router_options` holds its settings (docs/config.md,
"Router options").
"""

from mtmoe.model.routers.base import (
    ROUTERS,
    NoOptions,
    Router,
    RouterOutput,
    RouterShape,
    build_router,
    check_family,
    check_router,
    register_router,
    router_class,
    router_options,
)
from mtmoe.model.routers.soft import SoftOptions, SoftSliceRouter
from mtmoe.model.routers.task_gate import TaskGateRouter
from mtmoe.model.routers.topk import TopKOptions, TopKRouter, load_balance_loss, update_balance_biases

__all__ = [
    "ROUTERS",
    "NoOptions",
    "Router",
    "RouterOutput",
    "RouterShape",
    "SoftOptions",
    "SoftSliceRouter",
    "TaskGateRouter",
    "TopKOptions",
    "TopKRouter",
    "build_router",
    "check_family",
    "check_router",
    "load_balance_loss",
    "register_router",
    "router_class",
    "router_options",
    "update_balance_biases",
]
