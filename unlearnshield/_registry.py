"""Name-to-factory registries: the one way components are looked up by name.

Every family (models, datasets, unlearning methods, defenses, attackers) keeps one
:class:`Registry`. The CLI takes its choices from the registries, so a new component
appears on the command line as soon as it is registered.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A mapping from names to factories, with clear errors for unknown or duplicate names.

    Args:
        kind: what the registry holds, used in error messages ("model", "defense", ...).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, *, force: bool = False) -> Callable[[T], T]:
        """Decorator that registers ``obj`` under ``name``; refuses duplicates unless ``force``."""

        def decorator(obj: T) -> T:
            if name in self._entries and not force:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        """The entry registered under ``name``; a ``KeyError`` lists the valid names."""
        try:
            return self._entries[name]
        except KeyError:
            valid = ", ".join(sorted(self._entries)) or "(none)"
            raise KeyError(f"unknown {self.kind} {name!r}; choose one of: {valid}") from None

    def names(self) -> list[str]:
        """All registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
