"""Prefect tasks: each a thin, typed step of a flow over ``infra`` and ``models``.

A task that runs in the flow's own thread has a timeout (``TIMEOUT_S``, seconds): a hung download, server or
Ray call fails its task, and so the flow run, instead of holding the worker forever. Training budgets are long
but finite; a deployment that needs more sets ``task.with_options(timeout_seconds=...)``. Prefect enforces a
task timeout only in the thread that runs the flow (by a signal); a task submitted to the flow's thread pool
(``fit-strategy``: the comparison's children train side by side) gets none, which Prefect would otherwise
say in a warning per task run, and the flow's own timeout (``FLOW_TIMEOUT_S``) bounds it instead.
"""

TIMEOUT_S: dict[str, float | None] = {
    "download-data": 3600, "build-model": 900, "check-unchanged": 600, "train": 24 * 3600,
    "fit-strategy": None, "tune-lr": 24 * 3600, "summarize": 600, "evaluate": 3600, "publish": 1800,
    "promote": 900, "prune-checkpoints": 600,
}
FLOW_TIMEOUT_S = 48 * 3600  # a flow run: its tasks in sequence, with retries
