"""One registry type for every "name -> implementation" table in mmie.

Objectives, retain losses, SAE architectures, adapter methods, ReFT interventions and gates,
layer metrics and strategies, MLP layouts, gates and LID backends each register themselves by
name (adding a method is adding a file); this class gives them the same duplicate check, the
same "unknown name" error listing the known ones, and the same read-only mapping view.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """Named items of one kind, in registration order.

    kind: what an item is, for messages ("objective", "SAE architecture").
    tag: if set, :meth:`add` stores the name on the item under this attribute (e.g. a registered
        class learns its own ``name``), so an instance can say what it was registered as.
    """

    def __init__(self, kind: str, *, tag: str | None = None) -> None:
        self.kind, self.tag = kind, tag
        self._items: dict[str, T] = {}

    def add(self, name: str, item: T) -> T:
        """Register ``item`` under ``name``; a second item under the same name is refused."""
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        if self.tag is not None:
            setattr(item, self.tag, name)
        self._items[name] = item
        return item

    def decorator(self, name: str) -> Callable[[T], T]:
        """``@registry.decorator("name")`` on a class or function registers it as ``name``."""
        return lambda item: self.add(name, item)

    def lookup(self, name: str) -> T:
        """The item called ``name``, or a ValueError listing the known names."""
        if name not in self._items:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __getitem__(self, name: str) -> T:
        return self._items[name]

    def __setitem__(self, name: str, item: T) -> None:
        """Replace an existing entry (a test stub, a patched backend); new names go through
        :meth:`add`, so a typo cannot register a second implementation silently."""
        if name not in self._items:
            raise KeyError(f"{self.kind} {name!r} is not registered; use add()")
        self._items[name] = item

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._items)})"
