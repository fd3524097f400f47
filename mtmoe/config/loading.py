"""Loading a recipe: YAML plus dotted overrides into the typed sections, every key and type checked."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from mtmoe.config.legacy import migrate_router_keys
from mtmoe.config.sections import Config


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Loads a recipe, applies `dotted.key=value` overrides, and validates the result.

    Args:
        path: A YAML recipe, or None for the defaults.
        overrides: Items like `train.steps=10` or `moe.layers=[0,1]`; values are parsed as YAML.

    Returns:
        The validated config.

    Raises:
        ValueError: For an unknown key, a value of the wrong type, or an invalid value; the message
            names the key (and the recipe file).
    """
    raw: dict[str, Any] = {}
    where = "overrides"
    if path is not None:
        where = str(path)
        raw = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a recipe must be a mapping of sections")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r}: expected dotted.key=value")
        node = raw
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section")
        node[leaf] = yaml.safe_load(value)
    migrate_router_keys(raw, where)
    cfg = _build(Config, raw, prefix="", where=where)
    cfg.validate()
    return cfg


def build_section(cls: type, raw: Any, prefix: str, where: str = "config") -> Any:
    """A dataclass from plain data, checked as a recipe's sections are.

    Unknown keys and wrong types raise `ValueError` naming `prefix` + key (e.g. `balance.options.` for a
    weighter's options); the dataclass's own `__post_init__` checks the values.
    """
    return _build(cls, raw, prefix, where)


def _build(cls: type, raw: Any, prefix: str, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: config key {prefix.rstrip('.') or '<root>'!r} must be a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        key = f"{prefix}{unknown[0]}"
        moved = ""
        if prefix == "balance.":  # the flat weighter keys of earlier recipes, e.g. balance.dwa_temperature
            moved = "; a weighter's settings are under balance.options (docs/config.md, Weighter options)"
        raise ValueError(f"{where}: config key {key!r} does not exist; known keys: {sorted(fields)}{moved}")
    kwargs = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{prefix}{name}.", where)
        else:
            kwargs[name] = _coerce(value, hint, f"{prefix}{name}", where)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str, where: str) -> Any:
    """Checks a scalar/list value against a type hint; ints are accepted where floats are expected."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for option in options:
        origin = typing.get_origin(option) or option
        if origin is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if origin is float and isinstance(value, str):  # YAML 1.1 reads `3e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin is bool and isinstance(value, bool):
            return value
        if origin is str and isinstance(value, str):
            return value
        if origin is list and isinstance(value, list):
            (item_hint,) = typing.get_args(option)
            return [_coerce(v, item_hint, f"{key}[{i}]", where) for i, v in enumerate(value)]
        if origin is dict and isinstance(value, dict):
            return dict(value)
    raise ValueError(f"{where}: config key {key!r} has value {value!r}, expected {hint}")


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain data (for logging and checkpoints)."""
    return dataclasses.asdict(cfg)
