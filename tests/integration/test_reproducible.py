"""Runs are reproducible from their seed through the whole pipeline (Ray Train, MLflow, S3), also when two run
at once and publish to one model name, and early stopping publishes the epoch it kept."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from infra.publishing.load import load_published
from infra.publishing.store import ModelStore
from infra.stack.ray_nodes import RayCluster
from infra.storage.s3 import s3_client, split_uri
from tests.integration.conftest import Stack, headbench_runs

MODEL = "repro"
# 1-worker CPU runs. At this LR and seed the val loss falls, then rises at epoch 3: patience 1 stops there and
# keeps epoch 2.
RUN = ["--classes", "3-5", "--limit", "120", "--test-limit", "60", "--image-size", "32", "--workers", "1",
       "--batch-size", "16", "--strategy", "mlp", "--augment", "standard", "--model-name", MODEL, "--seed", "3",
       "--epochs", "4", "--lr", "0.2", "--early-stopping-patience", "1"]


@pytest.fixture(scope="module")
def twin_runs(stack: Stack, ray_cluster: RayCluster) -> list[tuple[str, dict[str, Any], str]]:
    """The same run twice, seed 3, with early stopping, both started at once on the cluster (1 CPU each of its
    3), both publishing to one model name: (MLflow run id, manifest, S3 URI) of each."""
    twins = []
    for run in headbench_runs(stack, [RUN, RUN]):
        bucket, prefix = split_uri(run["s3_uri"])
        body = s3_client(stack.settings).get_object(Bucket=bucket, Key=prefix + "manifest.json")["Body"].read()
        twins.append((run["run_id"], json.loads(body), run["s3_uri"]))
    return twins


def test_two_retrains_at_once_get_two_runs_prefixes_and_versions(stack: Stack, twin_runs: list[Any]) -> None:
    """Two runs of one model name at once: two MLflow runs, two S3 prefixes, versions 1 and 2; promotions are
    serialized by the lease, so the first to take it met no champion and was promoted, the second was compared
    with exactly that version (the same seed's score: not better, so rejected)."""
    client = s3_client(stack.settings)
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=stack.settings.model_bucket,
                                                            Prefix=f"{MODEL}/").get("Contents", []))
    manifests = [k for k in keys if k.endswith("manifest.json")]
    assert sorted(k.split("/")[1] for k in manifests) == sorted(run_id for run_id, _, _ in twin_runs)
    mlflow = MlflowClient(stack.settings.mlflow_tracking_uri)
    tags = {v.version: v.tags for v in mlflow.search_model_versions(f"name = '{MODEL}'")}
    assert sorted(tags) == ["1", "2"]
    first = [v for v, t in tags.items() if "champion_version" not in t]
    assert len(first) == 1 and tags[first[0]]["promotion"] == "champion", tags
    (second,) = set(tags) - set(first)
    assert tags[second]["champion_version"] == first[0], tags
    assert tags[second]["challenger_score"] == tags[second]["champion_score"]  # the same model, twice
    assert tags[second]["promotion"] == "challenger-rejected", tags
    assert mlflow.get_model_version_by_alias(MODEL, "champion").version == first[0]
    pointer = ModelStore(client, stack.settings.model_bucket, stack.settings.s3_endpoint_url).read_champion(MODEL)
    assert pointer and pointer["version"] == first[0]


def test_same_seed_same_metrics_and_same_published_weights(stack: Stack, twin_runs: list[Any]) -> None:
    # that another seed gives other weights and another curve is tests/unit/test_loop.py's (the same fit)
    (first_id, first, _), (second_id, second, _) = twin_runs
    assert first_id != second_id
    assert first["sha256"] == second["sha256"]  # bit for bit: init, data order, dropout, augmentation
    assert first["metrics"] == second["metrics"]
    uri = stack.settings.mlflow_tracking_uri
    assert uri
    client = MlflowClient(uri)
    curves = [[m.value for m in client.get_metric_history(i, "train_loss")] for i in (first_id, second_id)]
    assert len(curves[0]) >= 2 and curves[0] == curves[1]


def test_early_stopping_publishes_the_best_epoch(stack: Stack, twin_runs: list[Any], tmp_path: Path) -> None:
    run_id, _, s3_uri = twin_runs[0]
    uri = stack.settings.mlflow_tracking_uri
    assert uri
    client = MlflowClient(uri)
    losses = [m.value for m in sorted(client.get_metric_history(run_id, "val_loss"), key=lambda m: m.step)]
    run = client.get_run(run_id)
    best = int(np.nanargmin(losses)) + 1  # a NaN loss is never the best
    assert run.data.tags["chosen_epoch"] == str(best)
    assert run.data.tags["stopped_early"] == "true" and len(losses) == best + 1 < 4
    assert run.data.params["early_stopping_patience"] == "1"
    # the published weights are the best epoch's (kept in the checkpoint), not the last epoch's
    client_s3 = s3_client(stack.settings)
    keys = [o["Key"] for o in client_s3.list_objects_v2(Bucket=stack.settings.checkpoint_bucket,
                                                        Prefix=f"ray/{run_id}/")["Contents"]]
    last = max(k.rsplit("/", 1)[0] for k in keys if k.endswith("/best.safetensors"))
    files = {}
    for name in ("best.safetensors", "model.safetensors"):
        path = tmp_path / name
        client_s3.download_file(stack.settings.checkpoint_bucket, f"{last}/{name}", str(path))
        files[name] = load_file(path)
    published, _ = load_published(s3_uri, stack.settings)
    state = published.state_dict()
    assert all(torch.equal(state[k], v) for k, v in files["best.safetensors"].items())
    assert not all(torch.equal(state[k], v) for k, v in files["model.safetensors"].items())
