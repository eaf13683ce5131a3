"""Interruption of a run: Ctrl-C on the CLI (SIGINT), `headbench down` or a Prefect cancellation (SIGTERM,
which Prefect's engine raises as ``TerminationSignal``).

One process-wide flag, ``INTERRUPTED``, set by ``interrupt()``, which also aborts this process's Ray job at
once: ``ray.shutdown()`` disconnects the driver, and Ray kills every actor the job owns (Train's
controller, and through it the worker group) on every node; a private local Ray is stopped whole. MLflow
runs that end while the flag is set are KILLED, not FAILED (``infra.tracking.Tracker.lifecycle``), and the
flows end their Prefect flow run CANCELLED.
"""

from __future__ import annotations

import threading
from contextlib import suppress

INTERRUPTED = threading.Event()


def is_interrupt(exc: BaseException) -> bool:
    """Ctrl-C, SIGTERM (Prefect's TerminationSignal) or an exit: a BaseException that is not an error."""
    return not isinstance(exc, Exception) and not isinstance(exc, GeneratorExit)


def interrupt() -> None:
    """Set the flag and abort the Ray job of this process (idempotent; a few seconds at most)."""
    INTERRUPTED.set()
    import sys

    ray = sys.modules.get("ray")  # never import Ray just to stop it
    if ray is not None and ray.is_initialized():
        with suppress(Exception):  # best effort: the process is ending anyway
            ray.shutdown()
