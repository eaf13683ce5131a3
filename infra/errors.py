"""Errors that the CLI prints as one line (no traceback) with a non-zero exit code."""


class HeadbenchError(RuntimeError):
    """A user-facing failure whose message names the bad value and what is allowed or what to do."""
