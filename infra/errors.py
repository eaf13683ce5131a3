"""Errors that the CLI prints as one line (no traceback) with a non-zero exit code."""

from __future__ import annotations

from typing import Any


class HeadbenchError(RuntimeError):
    """A user-facing failure whose message names the bad value and what is allowed or what to do."""

    transient = False  # True: a retry may succeed (a server that is down or overloaded)


def is_transient(exc: BaseException | None) -> bool:
    """Bad input never heals by retrying; connection trouble may."""
    if isinstance(exc, HeadbenchError):
        return exc.transient
    return isinstance(exc, (ConnectionError, TimeoutError, OSError)) and not isinstance(exc, FileNotFoundError)


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry IO tasks only when the failure is transient."""
    return is_transient(state.result(raise_on_failure=False))
