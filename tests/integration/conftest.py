"""Session fixtures: a REAL local stack (SeaweedFS S3, MLflow, Prefect) and a REAL Ray head, on free ports."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from infra.ray_cluster import RayHead, start_ray_head
from infra.settings import Settings, load_settings
from infra.stack import LocalStack, free_ports

pytestmark = pytest.mark.integration


@dataclass
class Stack:
    stack: LocalStack
    settings: Settings  # resolved from the stack's env file, as the CLI does

    @property
    def home(self) -> Path:
        return self.stack.home

    def cli_env(self, **extra: str) -> dict[str, str]:
        """Environment for a `headbench` subprocess: only HEADBENCH_HOME points at the stack."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("MLFLOW_", "AWS_", "PREFECT_API", "RAY_ADDRESS"))}
        return env | {"HEADBENCH_HOME": str(self.home), "COLUMNS": "300"} | extra


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("stack")
    local = LocalStack(load_settings(home), free_ports())
    try:
        local.up(timeout=240)
        yield Stack(local, load_settings(home))
    finally:
        local.down()


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayHead]:
    head = start_ray_head(num_cpus=2, log_dir=tmp_path_factory.mktemp("ray"))
    try:
        yield head
    finally:
        head.stop(timeout=15)
