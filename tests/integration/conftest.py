"""Session fixtures: a REAL local stack on free ports, built by the same code as `headbench up --ray-nodes 2
--ray-cpus 2,1`: SeaweedFS S3, MLflow, Prefect, a Prefect worker and a two-node Ray cluster."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from infra.settings import Settings, load_settings
from infra.stack.local import LocalStack, free_ports
from infra.stack.ray_nodes import RayCluster
from infra.storage.s3 import s3_client
from tests.conftest import env_without_stack
from tests.dataset_files import png

# The cluster's shape: a head with 2 CPUs (node 0) and a worker node with 1 CPU (node 1), two raylets on
# 127.0.0.1. PACK keeps two 1-CPU workers on the head, SPREAD puts one on each node.
RAY_NODE_CPUS = [2, 1]
HEADBENCH = str(Path(sys.executable).parent / "headbench")
E2E_EPOCHS = 2


@dataclass
class Stack:
    stack: LocalStack
    settings: Settings  # resolved from the stack's env file, as the CLI does

    @property
    def home(self) -> Path:
        return self.stack.home

    def cli_env(self, **extra: str) -> dict[str, str]:
        """Environment for a `headbench` subprocess: only HEADBENCH_HOME points at the stack."""
        return env_without_stack() | {"HEADBENCH_HOME": str(self.home), "COLUMNS": "300"} | extra


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("stack")
    local = LocalStack(load_settings(home), free_ports(), ray_nodes=len(RAY_NODE_CPUS), ray_cpus=RAY_NODE_CPUS)
    names = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "RAY_AUTH_MODE",
             "RAY_AUTH_TOKEN")
    saved = {name: os.environ.get(name) for name in names}
    try:
        local.up(timeout=240)
        # MLflow's fluent loaders, and MlflowClient.list_artifacts on a run with a logged model, resolve models
        # through the environment's tracking URI (not the client's): without it they open ./mlflow.db. Every
        # MLflow client reads the login, and every Ray client the token, from the environment too.
        os.environ.update({"MLFLOW_TRACKING_URI": local.mlflow_url} | local.credential_env())
        yield Stack(local, load_settings(home))
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        # clean-up only (test_stack checks `down` itself): what has not stopped 5 s after its SIGTERM is killed
        local.down(timeout=5)


@pytest.fixture(scope="session")
def e2e_run(stack: Stack, ray_cluster: RayCluster) -> dict[str, str]:
    """One `headbench run` on a tiny subset, 2 workers SPREAD over both nodes: the run that the end-to-end
    checks (test_retrain_e2e), the MLflow-model checks (test_mlflow_model) and the secret scan (test_secrets)
    look at from the outside. replace-fc, so its weights are torchvision's."""
    return headbench_run(stack, "--classes", "0-2", "--limit", "150", "--test-limit", "60", "--image-size", "32",
                         "--epochs", str(E2E_EPOCHS), "--workers", "2", "--batch-size", "32",
                         "--strategy", "replace-fc", "--placement-strategy", "SPREAD", "--model-name", "e2e-test",
                         "--seed", "3")


def run_id_of(url: str) -> str:
    """The run id in an MLflow UI link to a run (…/#/experiments/E/runs/ID?…)."""
    found = re.search(r"/runs/([0-9a-f]{32})\b", url)
    assert found, url
    return found.group(1)


def headbench_run(stack: Stack, *args: str, timeout: float = 900) -> dict[str, str]:
    """`headbench run ARGS` against the stack, which must succeed: its MLflow run id, S3 URI and output."""
    return headbench_runs(stack, [list(args)], timeout)[0]


def headbench_runs(stack: Stack, runs: list[list[str]], timeout: float = 900) -> list[dict[str, str]]:
    """Several `headbench run`s started together (each its own command, as two users would start them), all of
    which must succeed: the run id, S3 URI and output of each."""
    procs = [subprocess.Popen([HEADBENCH, "run", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=stack.cli_env()) for args in runs]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, out[-4000:] + err[-4000:]
        run_url = re.search(r"MLflow run : (\S+)", out)
        s3_uri = re.search(r"S3 model   : (\S+)", out)
        assert run_url and s3_uri, out
        results.append({"run_id": run_id_of(run_url.group(1)), "s3_uri": s3_uri.group(1),
                        "stdout": out + err})
    return results


IMAGEFOLDER = "skiptest/flowers"  # an ImageFolder prefix in the data bucket: daisy and rose, 14 PNGs each


@pytest.fixture(scope="session")
def imagefolder_run(stack: Stack, ray_cluster: RayCluster) -> tuple[list[str], dict[str, str]]:
    """The first `headbench run` on an ImageFolder in S3, 2 workers PACKed onto the 2-CPU head, promoted to
    champion of ``skiptest``: (its arguments, its run). test_multinode checks its placement, test_mlflow_model
    what skip_if_unchanged does with it."""
    s3 = s3_client(stack.settings)
    rng = np.random.default_rng(0)
    for cls, base in (("daisy", 40), ("rose", 200)):
        for i in range(14):
            s3.put_object(Bucket=stack.settings.data_bucket, Key=f"{IMAGEFOLDER}/{cls}/{i}.png",
                          Body=png(int(base + rng.integers(0, 20))))
    args = ["--dataset", f"s3://{stack.settings.data_bucket}/{IMAGEFOLDER}", "--image-size", "32", "--epochs", "1",
            "--workers", "2", "--cpus-per-worker", "1", "--placement-strategy", "PACK", "--batch-size", "8",
            "--strategy", "replace-fc", "--model-name", "skiptest", "--skip-if-unchanged"]
    return args, headbench_run(stack, *args)


@pytest.fixture(scope="session")
def ray_cluster(stack: Stack) -> RayCluster:
    """The stack's Ray cluster; every CLI run against the stack trains on it (RAY_ADDRESS in its env file)."""
    cluster = stack.stack.ray_cluster()
    assert cluster is not None
    return cluster


def train_actor_nodes(cluster: RayCluster, tracking_uri: str, run_id: str) -> dict[str, set[str]]:
    """{actor class: node ids} of the Ray Train actors of one MLflow run's training (RayTrainWorker,
    TrainController...), from Ray's state API: the run's `ray.job_id` tag names the driver's job, whose actors
    Ray keeps listing after they exit."""
    from mlflow.tracking import MlflowClient
    from ray.util.state import list_actors

    job_id = MlflowClient(tracking_uri).get_run(run_id).data.tags["ray.job_id"]
    actors = list_actors(address=cluster.dashboard_url, limit=1000, detail=True, raise_on_missing_output=False,
                         filters=[("job_id", "=", job_id)])
    nodes: dict[str, set[str]] = {}
    for actor in actors:
        nodes.setdefault(actor.class_name, set()).add(actor.node_id)
    return nodes


def train_worker_nodes(cluster: RayCluster, tracking_uri: str, run_id: str) -> set[str]:
    """Node ids of the RayTrainWorker actors of one MLflow run's training."""
    return train_actor_nodes(cluster, tracking_uri, run_id).get("RayTrainWorker", set())
