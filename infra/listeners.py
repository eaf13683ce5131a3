"""Callbacks subscribed for the duration of a block, in a context variable: ``with LISTENERS.subscribed(fn):
...`` and whoever announces inside that block calls each ``fn``; two callers in two contexts never hear each
other, and with nobody subscribed an announcement costs one context-variable read. Flow stages
(``flows.stages``), download progress (``infra.data.download``) and a run's timeline marks
(``infra.training.timeline``) are announced this way."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Generic, TypeVar

L = TypeVar("L", bound=Callable[..., object])


class Listeners(Generic[L]):
    """The listeners of one kind of announcement."""

    def __init__(self, name: str) -> None:
        self._var: ContextVar[tuple[L, ...]] = ContextVar(name, default=())

    @contextmanager
    def subscribed(self, listener: L) -> Iterator[None]:
        """``listener`` hears every announcement made inside this block (in this context)."""
        token = self._var.set((*self._var.get(), listener))
        try:
            yield
        finally:
            self._var.reset(token)

    def current(self) -> tuple[L, ...]:
        return self._var.get()
