"""Wall-clock marks of a run's start-up (Ray connected, fit called) and end (fit returned, final weights
loaded), for whoever listens in this context: the benchmark's breakdowns. ``with recording(fn): ...`` calls
``fn(name, time.time())`` at each ``mark(name)`` made inside the block; with nobody listening a mark costs a
context-variable read."""

from __future__ import annotations

import time
from collections.abc import Callable

from infra.listeners import Listeners

Listener = Callable[[str, float], object]
_listeners: Listeners[Listener] = Listeners("headbench_timeline_listeners")
recording = _listeners.subscribed


def mark(name: str) -> None:
    now = time.time()
    for listener in _listeners.current():
        listener(name, now)
