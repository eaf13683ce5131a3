"""Interruption of a run: Ctrl-C on the CLI (SIGINT), `headbench down` or a Prefect cancellation (SIGTERM,
which Prefect's engine raises as ``TerminationSignal``).

One process-wide flag, ``INTERRUPTED``, set by ``interrupt()``. The Ray job is aborted by ending this process
(``os._exit`` once the runs are marked, or the flow-run process's normal exit): Ray then kills every actor the
job owns on every node. MLflow
runs that end while the flag is set are KILLED, not FAILED (``infra.tracking.runs.Tracker.lifecycle``), and the
flows end their Prefect flow run CANCELLED.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

INTERRUPTED = threading.Event()


def is_interrupt(exc: BaseException) -> bool:
    """Ctrl-C, SIGTERM (Prefect's TerminationSignal) or an exit: a BaseException that is not an error."""
    return not isinstance(exc, Exception) and not isinstance(exc, GeneratorExit)


def interrupt() -> None:
    """Set the flag (idempotent). The Ray job ends with this process: when the driver exits, Ray kills every
    actor the job owns (Train's controller, and through it the worker group) on every node. Calling
    ``ray.shutdown()`` here instead could crash the process while the fit thread is inside Ray's core."""
    INTERRUPTED.set()


def fit_interruptibly(runner: Any) -> Any:
    """``runner.fit()`` (a Ray Train trainer or a Ray Tune tuner) on a helper thread while this thread waits in
    short joins, so that Ctrl-C or SIGTERM reaches this thread at once, even while Ray waits for resources; the
    interrupt then aborts the Ray job (``interrupt``).

    Called on the main thread, both would install a SIGINT handler of their own that outlives the fit: Train's
    waits for a graceful abort and then exits the process, and after the run it swallows the next Ctrl-C (it
    aborts the finished run's controller, which it keeps alive); Tune's only sets its finished experiment's
    stop flag. On a helper thread they install none."""
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = runner.fit()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name="ray-fit", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.25)
    except BaseException:
        interrupt()
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


@contextmanager
def _handling(handlers: dict[signal.Signals, Any]) -> Iterator[None]:
    """``handlers`` installed inside the block, the previous ones back after it. No-op off the main thread,
    where Python cannot install a signal handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def sigterm_as_interrupt() -> AbstractContextManager[None]:
    """SIGTERM raises KeyboardInterrupt on the main thread, as Ctrl-C does, so that ``finally`` clean-ups run
    (by default SIGTERM ends the process on the spot)."""
    return _handling({signal.SIGTERM: _raise_interrupt})


def shielded() -> AbstractContextManager[None]:
    """Ctrl-C and SIGTERM ignored while a clean-up runs, so that a second press cannot cut it short and leave
    what it was stopping behind."""
    return _handling({signal.SIGINT: signal.SIG_IGN, signal.SIGTERM: signal.SIG_IGN})
