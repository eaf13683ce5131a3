"""Prefect tasks: each a thin, typed step of a flow over ``infra`` and ``models``.

Every task has a timeout (``TIMEOUT_S``, seconds): a hung download, server or Ray call fails its task,
and so the flow run, instead of holding the worker forever. Training budgets are long but finite; a
deployment that needs more sets ``task.with_options(timeout_seconds=...)``.
"""

TIMEOUT_S: dict[str, float] = {
    "download-data": 3600, "build-model": 900, "check-unchanged": 600, "train": 24 * 3600,
    "fit-strategy": 24 * 3600, "tune-lr": 24 * 3600, "summarize": 600, "evaluate": 3600, "publish": 1800,
    "promote": 900, "prune-checkpoints": 600,
}
FLOW_TIMEOUT_S = 48 * 3600  # a flow run: its tasks in sequence, with retries
