"""Progress reporting that library code can use without printing.

Stages take a ``progress`` argument (a :class:`Progress`); the CLI passes a rich-backed one,
tests and library callers get the silent default. ``track`` wraps an iterable, ``task`` gives a
handle for loops whose length is known up front and that want to show live values (losses).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")


class Task:
    """Handle for one running loop; the silent version ignores every update."""

    def advance(self, n: int = 1, **fields: object) -> None:
        del n, fields

    def log(self, message: str) -> None:
        del message


class Progress:
    """Silent progress: the default for library use and tests."""

    def track(self, items: Iterable[T], total: int | None = None, desc: str = "") -> Iterator[T]:
        del total, desc
        yield from items

    @contextmanager
    def task(self, desc: str, total: int | None = None) -> Iterator[Task]:
        del desc, total
        yield Task()


SILENT = Progress()
