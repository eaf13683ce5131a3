"""Interruption of a run: Ctrl-C on the CLI (SIGINT), `headbench down` or a Prefect cancellation (SIGTERM,
which Prefect's engine raises as ``TerminationSignal``).

One process-wide flag, ``INTERRUPTED``, set by ``interrupt()``. The Ray job is aborted by ending this process
(``os._exit`` once the runs are marked, or the flow-run process's normal exit): Ray then kills every actor the
job owns on every node. MLflow
runs that end while the flag is set are KILLED, not FAILED (``infra.tracking.Tracker.lifecycle``), and the
flows end their Prefect flow run CANCELLED.
"""

from __future__ import annotations

import threading

INTERRUPTED = threading.Event()


def is_interrupt(exc: BaseException) -> bool:
    """Ctrl-C, SIGTERM (Prefect's TerminationSignal) or an exit: a BaseException that is not an error."""
    return not isinstance(exc, Exception) and not isinstance(exc, GeneratorExit)


def interrupt() -> None:
    """Set the flag (idempotent). The Ray job ends with this process: when the driver exits, Ray kills every
    actor the job owns (Train's controller, and through it the worker group) on every node. Calling
    ``ray.shutdown()`` here instead could crash the process while the fit thread is inside Ray's core."""
    INTERRUPTED.set()
