"""Wall-clock marks of a run's start-up (Ray connected, fit called) and end (fit returned, final weights
loaded), for whoever listens in this context: the benchmark's breakdowns. ``with recording(fn): ...`` calls
``fn(name, time.time())`` at each ``mark(name)`` made inside the block; with nobody listening a mark costs a
context-variable read."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

Listener = Callable[[str, float], object]
_listeners: ContextVar[tuple[Listener, ...]] = ContextVar("headbench_timeline_listeners", default=())


@contextmanager
def recording(listener: Listener) -> Iterator[None]:
    token = _listeners.set((*_listeners.get(), listener))
    try:
        yield
    finally:
        _listeners.reset(token)


def mark(name: str) -> None:
    now = time.time()
    for listener in _listeners.get():
        listener(name, now)
