"""Typed run configuration: nested dataclasses loaded from a YAML recipe plus dotted overrides.

A recipe is data (`launch/recipes/*.yaml`); every key maps to a field of `sections.py`, and an unknown
key is a `ValueError` that names it. The DeepSpeed JSON is derived from this config (see
`mtmoe.parallel.ds_config`), so batch sizes have one source of truth.

The sections are in `sections.py`, the loader in `loading.py`; everything is importable from here.
"""

from mtmoe.config.loading import build_section, load_config, to_dict
from mtmoe.config.sections import (
    FAMILIES,
    BalanceConfig,
    Config,
    DataConfig,
    LogConfig,
    ModelConfig,
    MoEConfig,
    ParallelConfig,
    TrainConfig,
    check,
)

__all__ = [
    "FAMILIES",
    "BalanceConfig",
    "Config",
    "DataConfig",
    "LogConfig",
    "ModelConfig",
    "MoEConfig",
    "ParallelConfig",
    "TrainConfig",
    "build_section",
    "check",
    "load_config",
    "to_dict",
]
