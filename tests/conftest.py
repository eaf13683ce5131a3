"""Test-wide environment (no foreign endpoints leak in, every Ray socket stays on 127.0.0.1) and the tiers:
every test under tests/integration/ is marked ``integration`` here, by path, and every test that uses a training
run's fixture ``training`` (the others that train carry the mark themselves)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import TypeVar

import pytest

from infra.training.cluster import LOOPBACK_ENV

K = TypeVar("K")

# What points a process at a stack: the standard variables of each tool and headbench's own.
STACK_VARIABLES = ("MLFLOW_", "AWS_", "PREFECT_API", "RAY_ADDRESS", "RAY_AUTH_", "HEADBENCH_")


def run_together(commands: dict[K, list[str]], env: dict[str, str], timeout: float) -> dict[K, tuple[int, str, str]]:
    """Independent commands started at once (side by side on the machine's cores), each awaited:
    {key: (exit status, stdout, stderr)}."""
    procs = {key: subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for key, argv in commands.items()}
    outcomes = {}
    for key, proc in procs.items():
        out, err = proc.communicate(timeout=timeout)
        outcomes[key] = (proc.returncode, out, err)
    return outcomes


def env_without_stack() -> dict[str, str]:
    """This process's environment less anything naming a stack (in-process calls may have exported the
    session stack's variables), for a subprocess given a stack of its own."""
    return {k: v for k, v in os.environ.items() if not k.startswith(STACK_VARIABLES)}


# Set before anything imports ray (its constants are read at import time).
for _name in list(os.environ):
    if _name.startswith(STACK_VARIABLES):
        del os.environ[_name]
os.environ.update(LOOPBACK_ENV)
# Ray reads its auth mode once, when it is imported (by whichever test module comes first): token, as every
# Ray the suite starts requires; the stack fixture supplies the token itself (RAY_AUTH_TOKEN) before any call
os.environ["RAY_AUTH_MODE"] = "token"
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")


INTEGRATION = Path(__file__).parent / "integration"
# the session and module fixtures that are training runs: a test that looks at one needs it trained
RUN_FIXTURES = {"e2e_run", "compare_run", "twin_runs", "imagefolder_run"}


@pytest.hookimpl(tryfirst=True)  # before xdist's, which reads the xdist_group marks set here
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION in item.path.parents:
            item.add_marker(pytest.mark.integration)
            # `make test` runs with pytest-xdist (-n 2 --dist loadgroup): every integration test in one worker,
            # in file order, on the one session stack; the unit tests run beside them in the other worker
            item.add_marker(pytest.mark.xdist_group("stack"))
        if RUN_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.training)


@pytest.hookimpl(tryfirst=True)  # before the test's fixtures: the session stack
def pytest_runtest_setup(item: pytest.Item) -> None:
    if getattr(item.config.option, "loadgroup", False) and INTEGRATION in item.path.parents \
            and not item.nodeid.endswith("@stack"):  # xdist appends "@<group>" under --dist loadgroup
        pytest.fail("pytest-xdist did not put this test in the group 'stack': spread over the workers, the "
                    "integration tests would start a stack in each, side by side; --dist loadgroup needs "
                    "pytest < 9.2 (pytest-dev/pytest-xdist#1386)", pytrace=False)
