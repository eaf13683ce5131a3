"""Stage announcements of a flow run (download, build, tune, train, evaluate, publish, promote, done).

A flow calls ``stage(name)`` as it moves on; whoever runs the flow in-process (the CLI's progress bar, the
benchmark's clock, a fault-injection test) subscribes for the duration of one call with
``with listening(fn): flow(params)``. Listeners live in a context variable, so two flows run by two callers
never hear each other, and a flow run from a deployment, with nobody listening, pays nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from prefect.states import State

P = TypeVar("P")
R = TypeVar("R")

STAGES = ("download", "build", "tune", "train", "evaluate", "publish", "promote", "done")

Listener = Callable[[str], object]
_listeners: ContextVar[tuple[Listener, ...]] = ContextVar("headbench_stage_listeners", default=())


@contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Call ``listener(stage)`` at each stage of the flows run inside this block (in this context)."""
    token = _listeners.set((*_listeners.get(), listener))
    try:
        yield
    finally:
        _listeners.reset(token)


def stage(name: str) -> None:
    """Announce that the flow run has reached ``name`` (one of ``STAGES``)."""
    assert name in STAGES, name
    for listener in _listeners.get():
        listener(name)


def cancel_on_interrupt(body: Callable[[P], R], params: P) -> R | State:
    """Run a flow's body; on Ctrl-C, or a SIGTERM that Prefect raises in the flow's thread, abort the Ray job,
    let the MLflow runs end KILLED, and end the flow run CANCELLED (a flow that returns a state ends in it)
    instead of Prefect's CRASHED."""
    from prefect.states import Cancelled

    from infra.interrupts import interrupt, is_interrupt

    try:
        return body(params)
    except BaseException as exc:
        if not is_interrupt(exc):
            raise
        interrupt()
        # SIGTERM reaches the body as Prefect's TerminationSignal, or as SystemExit where Ray's driver handler
        # ran instead (`headbench down`, a cancellation from the dashboard)
        what = "Ctrl-C" if isinstance(exc, KeyboardInterrupt) else "SIGTERM"
        return Cancelled(message=f"interrupted ({what}): the Ray job was aborted, the MLflow run is KILLED, "
                                 "nothing was published")
