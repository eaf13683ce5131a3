"""Unit tests are hermetic: each one starts without the standard variables that an earlier (integration)
test in the same process may have exported, and whatever it sets is undone after it."""

from __future__ import annotations

import os

import pytest

STANDARD = ("MLFLOW_", "AWS_", "PREFECT_API", "RAY_ADDRESS", "HEADBENCH_")


@pytest.fixture(autouse=True)
def _no_stack_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith(STANDARD)]:
        monkeypatch.delenv(name)
