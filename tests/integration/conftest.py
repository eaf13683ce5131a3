"""Session fixtures: a REAL local stack (SeaweedFS S3, MLflow, Prefect) and a REAL two-node Ray cluster, on
free ports."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from infra.ray_cluster import RayCluster, start_ray_cluster
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
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    """A head with 2 CPUs (node 0) and a worker node with 1 CPU (node 1), two raylets on 127.0.0.1: PACK keeps
    two 1-CPU workers on the head, SPREAD puts one on each node."""
    cluster = start_ray_cluster([2, 1], log_dir=tmp_path_factory.mktemp("ray"))
    try:
        yield cluster
    finally:
        cluster.stop(timeout=15)


def train_worker_nodes(cluster: RayCluster, tracking_uri: str, run_id: str) -> set[str]:
    """Node ids of the RayTrainWorker actors of one MLflow run's training, from Ray's state API: the run's
    `ray.job_id` tag names the driver's job, whose actors Ray keeps listing after they exit."""
    from mlflow.tracking import MlflowClient
    from ray.util.state import list_actors

    job_id = MlflowClient(tracking_uri).get_run(run_id).data.tags["ray.job_id"]
    actors = list_actors(address=cluster.dashboard_url, limit=1000, detail=True, raise_on_missing_output=False,
                         filters=[("class_name", "=", "RayTrainWorker"), ("job_id", "=", job_id)])
    return {a.node_id for a in actors}
