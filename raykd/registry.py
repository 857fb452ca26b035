"""A small generic name -> object registry.

Used for distillation methods, dataset formats and anything else that is picked by name from a
config. A duplicate name is a programming error; an unknown name is a user error and the message
suggests the closest registered names.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


def did_you_mean(word: str, candidates, *, n: int = 3, cutoff: float = 0.6, prefix: str = "") -> str:
    """`` Did you mean 'a' or 'b'?`` for the candidates closest to ``word`` (``prefix`` before
    each), or ``""`` when none is close: the one suggestion text of every raykd error."""
    close = difflib.get_close_matches(str(word), list(candidates), n=n, cutoff=cutoff)
    return f" Did you mean {' or '.join(repr(prefix + c) for c in close)}?" if close else ""


class RegistryError(KeyError):
    """Raised for duplicate or unknown registry names."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable.
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """Maps names to objects of one kind.

    Example:
        >>> METHODS: Registry[type] = Registry("distillation method")
        >>> @METHODS.register("kd")
        ... class KD: ...
        >>> METHODS.get("kd") is KD
        True
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers its target under ``name``."""

        def deco(obj: T) -> T:
            self.add(name, obj)
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        if name in self._items:
            raise RegistryError(f"{self.kind} {name!r} is already registered (by {self._items[name]!r})")
        self._items[name] = obj

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise RegistryError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        hint = did_you_mean(name, self._items, cutoff=0.5)
        return f"unknown {self.kind} {name!r}.{hint} Registered: {', '.join(sorted(self._items)) or '(none)'}."

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def __len__(self) -> int:
        return len(self._items)
