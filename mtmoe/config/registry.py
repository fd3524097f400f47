"""The named entries of one extension point (weighters, routers, merge methods) and their lookup."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(dict[str, T], Generic[T]):
    """The entries of one extension point, by the name a recipe or a flag chooses them with.

    Args:
        kind: What an entry is, for messages (`router`).
        chooser: What chooses one, for messages (`config key 'moe.router'`, `--merge`).
    """

    def __init__(self, kind: str, chooser: str):
        super().__init__()
        self.kind, self.chooser = kind, chooser

    def add(self, name: str, entry: T) -> None:
        """Registers `entry` as `name`.

        Raises:
            ValueError: If the name is taken.
        """
        if name in self:
            raise ValueError(f"{self.kind} {name!r} is registered twice ({self[name]!r}, {entry!r})")
        self[name] = entry

    def register_class(self, name: str, options: type) -> Callable[[type], type]:
        """Class decorator: registers the class as `name`, with `options` (its settings' dataclass)."""

        def add(cls: type) -> type:
            self.add(name, cls)
            cls.options = options
            return cls

        return add

    def lookup(self, name: str) -> T:
        """The entry `name`.

        Raises:
            ValueError: Naming the chooser and the registered names, for an unknown one.
        """
        if name not in self:
            raise ValueError(f"{self.chooser}: {name!r} is not one of {'|'.join(sorted(self))}")
        return self[name]
