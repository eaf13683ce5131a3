"""What every command prints, as a contract: user text on one unwrapped line each (``say``), and a failure as
one line ``error: <message>`` on stderr, last, with exit status 2 (``fail``): Prefect's queues are drained
first, and its log records reach the terminal without their tracebacks (the Prefect UI keeps them)."""

from __future__ import annotations

import copy
import logging
import sys
from typing import NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.text import Text

from models.data import clip

console = Console()
err = Console(stderr=True)


def say(line: str) -> None:
    """Print one unwrapped line (URLs stay copyable). No markup: lines carry user text (paths, class names,
    URIs) in which ``[x]`` or ``[/]`` would be eaten or crash Rich's markup parser."""
    console.print(line, soft_wrap=True, highlight=False, markup=False)


def drain_prefect(timeout_s: float = 5.0) -> None:
    """Deliver what Prefect still queues (events, API log lines) now. Its own drain runs at interpreter exit
    and, when the queue is not yet empty (a loaded machine), logs 'Still processing items: N items
    remaining...', which would land after the error line."""
    if "prefect" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (EventsWorker, APILogWorker):
        service.drain_all(timeout=timeout_s, at_exit=False)


def fail(message: str, code: int = 2) -> NoReturn:
    """The one-line error contract: ``error: <message>`` on stderr, exit ``code``, as the last line (Prefect's
    queues are drained first); the message is user text."""
    drain_prefect()
    err.print(Text.assemble(("error:", "bold red"), " ", message), highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else exc.__class__.__name__


def validation_line(exc: ValidationError) -> str:
    """First pydantic error as one line: the field (as its CLI option), the reason and the bad value."""
    e = exc.errors()[0]
    field = ".".join(str(p) for p in e["loc"])
    msg = str(e["msg"]).removeprefix("Value error, ")
    option = f"--{field.replace('_', '-')}: " if field else ""
    got = e.get("input")
    suffix = f" (got {clip(repr(got), 80)})" if field and not isinstance(got, dict) else ""
    return f"{option}{msg}{suffix}"


class _NoTraceback(logging.Formatter):
    """Formats a copy of each record without its traceback: the terminal gets one line per failure,
    while Prefect's API log handler (the UI) still receives the full traceback."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        bare = copy.copy(record)
        bare.exc_info, bare.exc_text, bare.stack_info = None, None, None
        return self.inner.format(bare)


def console_without_tracebacks() -> None:
    from prefect.logging.configuration import setup_logging

    setup_logging()
    for handler in logging.getLogger().handlers:
        if not isinstance(handler.formatter, _NoTraceback):
            handler.setFormatter(_NoTraceback(handler.formatter))
