"""Stage announcements of a flow run (download, build, tune, train, evaluate, publish, promote, done).

A flow calls ``stage(name)`` as it moves on; whoever runs the flow in-process (the CLI's progress bar, the
benchmark's clock, a fault-injection test) subscribes for the duration of one call with
``with listening(fn): flow(params)``. Listeners live in a context variable, so two flows run by two callers
never hear each other, and a flow run from a deployment, with nobody listening, pays nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from infra.listeners import Listeners

if TYPE_CHECKING:
    from prefect.states import State

P = TypeVar("P")
R = TypeVar("R")

STAGES = ("download", "build", "tune", "train", "evaluate", "publish", "promote", "done")

Listener = Callable[[str], object]
_listeners: Listeners[Listener] = Listeners("headbench_stage_listeners")
# ``with listening(fn): flow(params)``: ``fn(stage)`` at each stage of the flows run inside the block
listening = _listeners.subscribed


def stage(name: str) -> None:
    """Announce that the flow run has reached ``name`` (one of ``STAGES``)."""
    assert name in STAGES, name
    for listener in _listeners.current():
        listener(name)


def cancel_on_interrupt(body: Callable[[P], R], params: P) -> R | State:
    """Run a flow's body; on Ctrl-C, or a SIGTERM that Prefect raises in the flow's thread, abort the Ray job,
    let the MLflow runs end KILLED, and end the flow run CANCELLED (a flow that returns a state ends in it)
    instead of Prefect's CRASHED."""
    from prefect.states import Cancelled

    from infra.processes.interrupts import interrupt, is_interrupt

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
