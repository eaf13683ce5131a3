"""Runs are reproducible from their seed through the whole pipeline (Ray Train, MLflow, S3), and early
stopping publishes the epoch it kept."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from mlflow.tracking import MlflowClient

from infra.ray_cluster import RayCluster
from infra.s3 import s3_client, split_uri
from tests.integration.conftest import Stack

HEADBENCH = str(Path(sys.executable).parent / "headbench")


def _run(stack: Stack, cluster: RayCluster, seed: int, *extra: str) -> tuple[str, dict[str, object]]:
    """One 1-worker CPU run; (MLflow run id, published manifest)."""
    args = [HEADBENCH, "run", "--classes", "3-5", "--limit", "120", "--test-limit", "60", "--image-size", "32",
            "--epochs", "2", "--workers", "1", "--batch-size", "16", "--strategy", "mlp", "--augment", "standard",
            "--model-name", "repro", "--promote", "never", "--seed", str(seed), *extra]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, check=False,
                          env=stack.cli_env(RAY_ADDRESS=cluster.address))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_id = re.search(r"MLflow run : \S+/runs/(\w+)", done.stdout)
    s3_uri = re.search(r"S3 model   : (\S+)", done.stdout)
    assert run_id and s3_uri, done.stdout
    bucket, prefix = split_uri(s3_uri.group(1))
    body = s3_client(stack.settings).get_object(Bucket=bucket, Key=prefix + "manifest.json")["Body"].read()
    return run_id.group(1), json.loads(body)


def test_same_seed_same_metrics_and_same_published_weights(stack: Stack, ray_cluster: RayCluster) -> None:
    first_id, first = _run(stack, ray_cluster, 11)
    second_id, second = _run(stack, ray_cluster, 11)
    other_id, other = _run(stack, ray_cluster, 12)
    assert first_id != second_id
    assert first["sha256"] == second["sha256"]  # bit for bit: init, data order, dropout, augmentation
    assert first["metrics"] == second["metrics"]
    assert other["sha256"] != first["sha256"]  # and the seed does matter
    uri = stack.settings.mlflow_tracking_uri
    assert uri
    client = MlflowClient(uri)
    curves = [[m.value for m in client.get_metric_history(i, "train_loss")] for i in (first_id, second_id, other_id)]
    assert curves[0] == curves[1] != curves[2]


def test_early_stopping_publishes_the_best_epoch(stack: Stack, ray_cluster: RayCluster) -> None:
    run_id, manifest = _run(stack, ray_cluster, 3, "--epochs", "4", "--lr", "1.5", "--early-stopping-patience", "1")
    uri = stack.settings.mlflow_tracking_uri
    assert uri
    client = MlflowClient(uri)
    losses = [m.value for m in sorted(client.get_metric_history(run_id, "val_loss"), key=lambda m: m.step)]
    run = client.get_run(run_id)
    best = int(np.argmin(losses)) + 1
    assert run.data.tags["chosen_epoch"] == str(best)
    stopped = run.data.tags["stopped_early"] == "true"
    assert stopped == (len(losses) < 4) and (not stopped or len(losses) == best + 1)
    assert run.data.params["early_stopping_patience"] == "1"
    assert manifest["metrics"]["test_accuracy"] == run.data.metrics["test_accuracy"]
